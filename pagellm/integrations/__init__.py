"""pagellm inside other frameworks (Ray Data, ...). Nothing is imported here, so
``import pagellm`` never imports Ray: import the submodule you need."""
