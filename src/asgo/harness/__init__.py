"""Training harness for asgo: models, data, Hydra configuration, training loop, checkpoints, metrics.

The harness imports the library; the library never imports the harness. Nothing heavy is
imported here: use the submodules (``asgo.harness.models``, ``asgo.harness.train``, ...).
"""
