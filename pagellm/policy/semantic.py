"""The semantic half of the response cache: prompt embeddings and a small vector index.

A cacheable request that misses the exact-match cache is embedded (its system and user
text, not the chat template around them) and compared by cosine with the replies kept
for the same key, model and sampling options; the nearest one answers if its similarity
reaches the threshold. The vectors come from an embedding model pagellm serves: a name
this server serves (the engine pools its hidden states, as for ``/v1/embeddings``) or
another server's ``/v1/embeddings``.

The index is exact (brute-force inner product of unit vectors): FAISS's flat index when
``faiss`` is installed, numpy otherwise. A cache holds at most ``max_entries`` replies,
so an exact search stays well under a millisecond; approximate indexes (HNSW) pay off
only far beyond that.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from pagellm.policy import final_output
from pagellm.policy.config import EmbeddingSource
from pagellm.sampling_params import PoolingParams, RequestOutputKind, SamplingParams


def _unit(vector: Any) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class NumpyIndex:
    """Exact cosine search over unit vectors, by id."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.ids: list[str] = []
        self.rows = np.zeros((0, dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def members(self) -> list[str]:
        return list(self.ids)

    def add(self, key: str, vector: np.ndarray) -> None:
        self.ids.append(key)
        self.rows = np.vstack([self.rows, vector[None, :]])

    def remove(self, key: str) -> None:
        i = self.ids.index(key)
        del self.ids[i]
        self.rows = np.delete(self.rows, i, axis=0)

    def search(self, vector: np.ndarray) -> tuple[str, float] | None:
        if not self.ids:
            return None
        scores = self.rows @ vector
        i = int(np.argmax(scores))
        return self.ids[i], float(scores[i])


class FaissIndex:
    """The same search on FAISS's flat inner-product index (ids mapped to int64)."""

    def __init__(self, dim: int) -> None:
        import faiss

        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._ids: dict[str, int] = {}
        self._keys: dict[int, str] = {}
        self._next = itertools.count()

    def __len__(self) -> int:
        return len(self._ids)

    def members(self) -> list[str]:
        return list(self._ids)

    def add(self, key: str, vector: np.ndarray) -> None:
        n = next(self._next)
        self._ids[key], self._keys[n] = n, key
        self._index.add_with_ids(vector[None, :], np.array([n], dtype=np.int64))

    def remove(self, key: str) -> None:
        n = self._ids.pop(key)
        del self._keys[n]
        self._index.remove_ids(np.array([n], dtype=np.int64))  # type: ignore[arg-type]

    def search(self, vector: np.ndarray) -> tuple[str, float] | None:
        if not self._ids:
            return None
        scores, ids = self._index.search(vector[None, :], 1)
        return self._keys[int(ids[0, 0])], float(scores[0, 0])


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def make_index(kind: str, dim: int) -> NumpyIndex | FaissIndex:
    """``auto``: FAISS where installed, numpy otherwise."""
    if kind == "faiss" or (kind == "auto" and faiss_available()):
        return FaissIndex(dim)
    return NumpyIndex(dim)


class Embedder:
    """Unit vectors for texts, from this server's engine (a served name) or another
    server's ``/v1/embeddings``."""

    def __init__(self, source: EmbeddingSource, engine: Any, resolve: Any) -> None:
        self.source = source
        self._engine = engine
        self._resolve = resolve  # served name -> (name, LoRARequest | None)
        self._ids = itertools.count()

    async def embed(self, text: str) -> np.ndarray:
        """ValueError when the embedding cannot be had (the request then runs uncached)."""
        src = self.source
        text = src.template.replace("{text}", text)
        if src.url is not None:
            return _unit(await self._remote(text))
        _, lora = self._resolve(src.model)
        params = SamplingParams(max_tokens=1, temperature=0.0, pooling=PoolingParams(
            pooling_type=self._engine.config.model.pooling,
        ), output_kind=RequestOutputKind.FINAL_ONLY)  # fmt: skip
        stream = self._engine.add_request(
            {"prompt": text}, params, f"semantic-{next(self._ids)}", lora_request=lora
        )
        out = await final_output(stream)
        if out is None or out.embedding is None:
            raise ValueError("the embedding model returned no vector")
        return _unit(out.embedding)

    async def _remote(self, text: str) -> list[float]:
        import aiohttp

        src = self.source
        headers = {"Authorization": f"Bearer {src.api_key}"} if src.api_key else {}
        body = {"input": text, "model": src.model} if src.model else {"input": text}
        url = src.url.rstrip("/") + "/embeddings"  # type: ignore[union-attr]
        timeout = aiohttp.ClientTimeout(total=30)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, json=body, headers=headers) as r,
            ):
                if r.status != 200:
                    raise ValueError(f"{url} answered {r.status}: {(await r.text())[:200]}")
                data = await r.json()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ValueError(f"{url}: {e}") from None
        try:
            return list(data["data"][0]["embedding"])
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{url} answered without data[0].embedding") from None
