"""``asgo-train``: the Hydra command line of the training harness.

Exit status: 0 done; 1 a configuration or dataset error (one line, no traceback); 3 the training
loss or gradient norm became non-finite (train.on_nonfinite=stop; the last good checkpoint is
named and kept); 130 / 143 / 138 stopped by SIGINT (Ctrl-C) / SIGTERM / SIGUSR1 after writing a
checkpoint at the step boundary (128 + the signal's number; continue with train.resume=<checkpoint>).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asgo.harness.checkpoint import CheckpointError
from asgo.harness.config import ConfigError
from asgo.harness.data import DatasetError
from asgo.harness.train import Diverged, train

# conf/config.yaml's hydra.run.dir: train.out_dir when set (Hydra's .hydra/ and cli.log beside the run's
# outputs), else the default; oc.select would keep an explicit null
OmegaConf.register_new_resolver("asgo.run_dir", lambda out_dir, default: default if out_dir in (None, "") else out_dir,
                                replace=True)


@contextmanager
def exit_codes():
    """A run's known failures as one line on stderr and an exit status: 1 for a bad config,
    checkpoint or dataset, ``Diverged.exit_code`` (3), and 128 + the signal's number for a stop
    (train.Interrupted; a plain Ctrl-C: 130)."""
    try:
        yield
    except (ConfigError, CheckpointError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt as e:
        raise SystemExit(getattr(e, "exit_code", 130)) from None


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main:  # only rank 0 logs
        logging.getLogger().setLevel(logging.WARNING)
    out_dir = cfg.train.out_dir or HydraConfig.get().runtime.output_dir
    with exit_codes():
        result = train(cfg, out_dir)
    if is_main:
        print(f"final val loss: {result['final_val_loss']:.4f}")
        written = {"metrics": result["metrics"], "plot": result.get("plot"), "checkpoint": result["checkpoint"]}
        print("written: " + ", ".join(f"{k} {v}" for k, v in written.items() if v))
    return result["final_val_loss"]


if __name__ == "__main__":
    main()
