"""Tiny random reward-model checkpoints in the real hub layouts, built on demand (nothing is downloaded).

Each builder writes what the real release ships (config, weights, tokenizer, processor files) at toy size, with the
real model classes, seeded; the scorers then load it through their ordinary ``from_pretrained`` path. The tests use
them, and so do the tiny CPU twins of the reward experiments, through a YAML resolver::

    rewards:
      pickscore: {name: pickscore, model: "${tiny_reward:pickscore}"}

``${tiny_reward:NAME}`` (or ``NAME/SUBDIR``) builds the checkpoint once into ``$FIRM_TINY_CACHE`` (default
``~/.cache/firm/tiny``) and returns its path: the table of builders and the cache are in :mod:`firm.tiny_checkpoints`.
They are random models: their scores exercise the code, they mean nothing.
"""
