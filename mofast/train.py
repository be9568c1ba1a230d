"""`mofast train`: multi-objective DPO training.

With no arguments it trains mgda-decoupled on the embedded default (the shipped real
UltraFeedback pairs as two objectives and the shipped stories260K model; configs/default.yaml).
`--config FILE.yaml` (or the name of a shipped config) replaces that base; every field of
the config also has its own flag, applied last. `--resume RUN_DIR` continues a run from its
latest checkpoint with the configuration saved in the run folder.

On several GPUs or machines, launch it with torchrun and `--parallel ddp` or `--parallel fsdp`
(mofast/distributed.py); `micro_batch` is then per rank.
"""

import argparse
import logging
import time
from pathlib import Path

from mofast import checkpoint, distributed
from mofast.config import add_field_arguments, from_dict, load_yaml, overrides_from_args

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config file, or the name of a shipped config "
        f"(default: {DEFAULT_CONFIG}, the embedded real run)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint",
    )
    add_field_arguments(parser)
    parser.epilog = (
        "The defaults shown are the recipe's (SPEC section 5). Without --config, a run starts "
        f"from the shipped {DEFAULT_CONFIG}.yaml (the embedded real run) instead. A VALUE is "
        "read as YAML: null, true, 3e-6, {name: file.jsonl}."
    )


def _new_run_dir(combinator: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{stamp}-{combinator}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path("runs") / f"{stamp}-{combinator}-{suffix}"
    return path


def run(args: argparse.Namespace) -> int:
    from mofast.trainer import Trainer

    overrides = overrides_from_args(args)
    if args.resume:
        run_dir = Path(args.resume)
        if args.config:
            raise ValueError("--resume takes the run's own config.yaml; do not pass --config")
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a mofast run folder (no config.yaml)")
        if checkpoint.latest_checkpoint(run_dir) is None:
            raise FileNotFoundError(f"{run_dir} holds no checkpoint to resume from")
        # The folder resumed is the run, wherever it was first written (a copied or moved
        # run folder resumes too); only an explicit, different --output-dir contradicts it.
        given = overrides.get("output_dir")
        if given and Path(given).resolve() != run_dir.resolve():
            raise ValueError(f"--output-dir {given} differs from --resume {run_dir}")
        config = from_dict(overrides, load_yaml(run_dir / "config.yaml"))
    else:
        config = from_dict(overrides, load_yaml(args.config or DEFAULT_CONFIG))
        run_dir = Path(config.output_dir) if config.output_dir else _new_run_dir(config.combinator)

    # Under torchrun every rank must write into rank 0's folder (the time stamps may differ).
    context = distributed.setup(config.parallel)
    run_dir = Path(distributed.broadcast_object(str(run_dir), context))
    config = from_dict({"output_dir": str(run_dir)}, config)
    try:
        logger.info("run folder %s", run_dir)
        Trainer(config, run_dir, resume=bool(args.resume)).fit()
        written = ["metrics"]
        if config.plots:
            written.append("plots")
        if config.save_model:
            written.append("the final model")
        logger.info("done: %s in %s", " and ".join(written), run_dir)
    finally:
        distributed.shutdown(context)
    return 0
