"""cpattn inside other libraries' models, through the extension points those libraries offer.

* `cpattn.integrations.transformers`: importing it registers ``attn_implementation="cpattn"`` with transformers
  (every model whose attention layers go through transformers' attention interface), with `shard_batch`,
  `cp_loss` and `all_reduce_grads` for training under context parallelism (`cpattn.integrations.training`,
  which needs no transformers).
* `cpattn.integrations.diffusers`: diffusers models on cpattn, and context parallelism by a model's plan;
  `cpattn.integrations.parity` compares a context-parallel model with the same model on one process.

Nothing here is imported by ``import cpattn``: each submodule needs its library and is imported on its own.
"""
