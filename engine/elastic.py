"""torchrun's restarts of the process group, as its environment tells every worker
(torch.distributed.run): the restarts so far, the most it will make (`--max-restarts`), and the job.

A rank that runs out of memory cannot take the OOM ladder's next rung alone (engine.oom); with
restarts left, torchrun starts the whole group again and the run continues from run.json.
Outside torchrun every field is at its default: no restarts, no job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Elastic:
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: 0 in the group's first attempt
    max_restarts: int = 0  # TORCHELASTIC_MAX_RESTARTS
    job: str | None = None  # TORCHELASTIC_RUN_ID: the rendezvous id, a fresh uuid per `torchrun --standalone`

    @classmethod
    def from_env(cls) -> "Elastic":
        return cls(restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                   max_restarts=int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")),
                   job=os.environ.get("TORCHELASTIC_RUN_ID"))

    @property
    def restarts_left(self) -> int:
        return self.max_restarts - self.restart
