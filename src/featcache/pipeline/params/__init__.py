"""The schema of ``params.yaml``, one module per section, so that a stage imports only what it reads.

* :mod:`.base`: the strict base model, :class:`~.base.ConfigError` and the loader;
* :mod:`.data`: ``data`` (every stage that reads params);
* :mod:`.extract`: ``extract`` and ``backbones`` as plain values (the value sets
  come from :mod:`featcache.store.schema`), and the config a store records;
* :mod:`.backbones`: the registry checks of ``backbones`` (names, layers), for the stages that extract;
* :mod:`.train`: ``train``, ``heads`` and ``features`` (the head registry);
* :mod:`.finetune`: ``finetune`` (the fine-tuning schema).

Each stage declares the sections it reads as a :class:`~.base.StageParams`
model and validates only those; ``featcache check`` validates the whole file
(:class:`featcache.pipeline.config.Params`).
"""
