"""Workers of one engine: their ranks and collectives (torch.distributed)."""
