"""``asgo-train``: the Hydra command line of the training harness."""

from __future__ import annotations

import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from asgo.harness.train import train


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    out_dir = cfg.train.out_dir or HydraConfig.get().runtime.output_dir
    result = train(cfg, out_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final val loss: {result['final_val_loss']:.4f}")
        print(f"metrics: {result.get('metrics')}  plot: {result.get('plot')}  checkpoint: {out_dir}/checkpoint.pt")
    return result["final_val_loss"]


if __name__ == "__main__":
    main()
