"""``asgo-finetune``: the Hydra command line of the fine-tuning tasks (conf/finetune.yaml).

    asgo-finetune task=rte model.path=DIR preset=glue_golore
    asgo-finetune task=winogrande model.path=DIR preset=winogrande_golore_adamw

Exit status as ``asgo-train``: 0 done; 1 a configuration or dataset error (one line); 3 the loss or
gradient norm became non-finite; 130 / 143 / 138 stopped by SIGINT / SIGTERM / SIGUSR1 after
writing a checkpoint (continue with train.resume=<out_dir>/checkpoint.pt).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from asgo.harness.cli import exit_codes  # also registers the asgo.run_dir resolver of the configs
from asgo.harness.finetune.train import finetune


@hydra.main(config_path="../conf", config_name="finetune", version_base=None)
def main(cfg: DictConfig) -> float | None:
    out_dir = cfg.train.out_dir or HydraConfig.get().runtime.output_dir
    with exit_codes():
        summary = finetune(cfg, out_dir)
    head = summary["headline"]
    print(f"final {head['split']} {head['metric']}: {head['final']:.4f} (best {head['best']:.4f} at epoch "
          f"{head['best_epoch']})")
    print(f"written: metrics {summary['metrics']}, plot {summary.get('plot')}, checkpoint {summary['checkpoint']}")
    return head["final"]


if __name__ == "__main__":
    main()
