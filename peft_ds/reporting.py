"""Where the training loop's metrics rows go (`train.report_to`), on rank 0 only.

`metrics.jsonl` is always written: resume truncates it to the resumed step and `loss.png` is drawn
from it. `tensorboard` adds event files in `<output_dir>/tensorboard/`, and `wandb` a Weights & Biases
run (its files in `<output_dir>/wandb/`). Every number of a row is a scalar of the same name at the
row's step; a list of numbers (a value per layer) is one scalar per entry, `name/<index>`.

`check` runs with the other input checks, before any rank starts: an exporter that is not installed,
or a W&B that would ask for a login, is one line then rather than a failure after the model is built."""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import uuid
from urllib.parse import urlparse

from .errors import PeftDsError

TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"
WANDB_RUN_ID = "peft-ds-run-id"  # in <output_dir>/wandb/: the W&B run a resumed run appends to
WANDB_NO_LOGIN = ("offline", "disabled", "dryrun")  # WANDB_MODE values that need no account


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _wandb_logged_in() -> bool:
    """An API key in the environment, or `wandb login`'s entry in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check(report_to: list[str]) -> None:
    """The requested exporters can run here without asking anything (names are checked in config)."""
    if "tensorboard" in report_to and not _installed("tensorboard"):
        raise PeftDsError("train.report_to names tensorboard, which is not installed: `make install` (or pip "
                          "install tensorboard), or set train.report_to: [jsonl]")
    if "wandb" in report_to:
        if not _installed("wandb"):
            raise PeftDsError("train.report_to names wandb, which is not installed: pip install wandb, or drop "
                              "wandb from train.report_to")
        if os.environ.get("WANDB_MODE", "").lower() not in WANDB_NO_LOGIN and not _wandb_logged_in():
            raise PeftDsError("train.report_to names wandb, but W&B has no login here (no WANDB_API_KEY, no "
                              "~/.netrc entry): run `wandb login` once, or set WANDB_MODE=offline and later "
                              "`wandb sync <output_dir>/wandb`")


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row, by name (the step and non-numeric values left out)."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


class Reporter:
    """metrics.jsonl plus the exporters of `config.train.report_to`. `resumed_at`: the step a resumed
    run continues from (rows past it were dropped from metrics.jsonl; TensorBoard hides them too)."""

    def __init__(self, config, resumed_at: int | None):
        out, report_to = config.output_dir, config.train.report_to
        self.metrics = open(os.path.join(out, "metrics.jsonl"), "a" if resumed_at is not None else "w")
        self.tensorboard = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: readers drop the events an interrupted run wrote at or past the resumed step + 1
            self.tensorboard = SummaryWriter(os.path.join(out, TENSORBOARD_DIR),
                                             purge_step=None if resumed_at is None else resumed_at + 1)
        if "wandb" in report_to:
            self.wandb = _wandb_run(config, resumed_at is not None)

    def log(self, row: dict) -> None:
        """A step's row to every sink."""
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        values = scalars(row)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, global_step=row["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=row["step"])

    def close(self) -> None:
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(config, resume: bool):
    """A W&B run named after the output_dir (project: WANDB_PROJECT, else peft-ds); a resumed run
    appends to the run its first start made."""
    import wandb

    out = config.output_dir
    os.makedirs(os.path.join(out, WANDB_DIR), exist_ok=True)
    id_path = os.path.join(out, WANDB_DIR, WANDB_RUN_ID)
    if resume and os.path.isfile(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "peft-ds"), name=os.path.basename(os.path.abspath(out)),
                      id=run_id, resume="allow", dir=out, config=config.to_dict())
