"""``asgo-finetune``: the Hydra command line of the fine-tuning tasks (conf/finetune.yaml).

    asgo-finetune task=rte model.path=DIR preset=glue_golore
    asgo-finetune task=winogrande model.path=DIR preset=winogrande_golore_adamw

Exit status as ``asgo-train``: 0 done; 1 a configuration or dataset error (one line); 3 the loss or
gradient norm became non-finite; 130 / 143 / 138 stopped by SIGINT / SIGTERM / SIGUSR1 after
writing a checkpoint (continue with train.resume=<out_dir>/checkpoint.pt).
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import asgo.harness.cli  # noqa: F401  (registers the asgo.run_dir resolver of the configs)
from asgo.harness.checkpoint import CheckpointError
from asgo.harness.config import ConfigError
from asgo.harness.data import DatasetError
from asgo.harness.finetune.train import finetune
from asgo.harness.train import Diverged


@hydra.main(config_path="../conf", config_name="finetune", version_base=None)
def main(cfg: DictConfig) -> float | None:
    out_dir = cfg.train.out_dir or HydraConfig.get().runtime.output_dir
    try:
        summary = finetune(cfg, out_dir)
    except (ConfigError, CheckpointError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt as e:
        raise SystemExit(getattr(e, "exit_code", 130)) from None
    head = summary["headline"]
    print(f"final {head['split']} {head['metric']}: {head['final']:.4f} (best {head['best']:.4f} at epoch "
          f"{head['best_epoch']})")
    print(f"written: metrics {summary['metrics']}, plot {summary.get('plot')}, checkpoint {summary['checkpoint']}")
    return head["final"]


if __name__ == "__main__":
    main()
