"""`fit` under torchrun for tests/test_distributed_fit.py, with each rank keeping its own record.

Usage: torchrun --nproc-per-node N ddp_fit_driver.py SPEC_JSON
SPEC_JSON: {"record": DIR, "runs": [{"name": NAME, "fit": {fit's keyword arguments, config as a dict},
                                     optional "drift": {"rank": R}, optional "kill": {"rank": R, "step": S}},
                                    ...]}

The runs go one after the other in the same processes. Every rank writes DIR/NAME-rank<r>.json:
the sha256 of its own codebooks after each epoch end, computed here, independently of the code
under test. With a run's "drift", rank R moves one code by 1e-3 before each of that run's epoch
ends, which fit must notice and stop on: every rank's fit raises, and the driver writes what it
raised to DIR/NAME-rank<r>.error and goes on with the next run (any other run that raises ends the
driver). With a run's "kill", rank R sends itself SIGKILL before that run's S-th training step, as
a node failure would; torchrun then ends the other ranks, so it comes last.
"""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from revq_pipe.pipeline.train.trainer import Trainer
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit


def main(spec: dict) -> None:
    rank = int(os.environ["RANK"])
    record = Path(spec["record"])
    record.mkdir(parents=True, exist_ok=True)
    real_step, real_end_epoch = Trainer.step, Trainer.end_epoch
    hashes: list[str] = []
    current = {"run": {}, "steps": 0}

    def step(self, z):
        current["steps"] += 1
        kill = current["run"].get("kill")
        if kill and kill["rank"] == rank and current["steps"] == kill["step"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, z)

    def end_epoch(self, epoch):
        drift = current["run"].get("drift")
        if drift and drift["rank"] == rank:
            self.model.codebooks.data[0, 0] += 1e-3
        metrics = real_end_epoch(self, epoch)
        hashes.append(hashlib.sha256(self.model.codebooks.detach().cpu().numpy().tobytes()).hexdigest())
        (record / f"{current['run']['name']}-rank{rank}.json").write_text(json.dumps(hashes))
        return metrics

    Trainer.step, Trainer.end_epoch = step, end_epoch
    for run in spec["runs"]:
        current.update(run=run, steps=0)
        hashes.clear()
        try:
            fit(**{**run["fit"], "config": FitConfig.from_dict(run["fit"]["config"])})
        except Exception as error:
            if "drift" not in run:
                raise
            (record / f"{run['name']}-rank{rank}.error").write_text(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
