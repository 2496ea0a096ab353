"""cpattn inside other libraries' models, through the extension points those libraries offer.

* `cpattn.integrations.transformers`: importing it registers ``attn_implementation="cpattn"`` with transformers
  (every model whose attention layers go through transformers' attention interface), with helpers that shard a
  batch and compute the loss under context parallelism.

Nothing here is imported by ``import cpattn``: each submodule needs its library and is imported on its own.
"""
