"""`python -m scifm.train` with FSDP2's float8 all-gathers counted, run under torchrun (gloo, CPU).

torchao's weights that FSDP2 gathers in float8 hand it their all-gather input through
`fsdp_pre_all_gather`; the worker wraps that method, then trains with the Hydra overrides it is
given. Rank 0 writes how many gathers asked for an input, the inputs' dtypes, and how many of them
took a scale precomputed after an optimizer step instead of all-reducing the weight's own amax.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args, overrides = parser.parse_known_args()
    seen = {"gathers": 0, "precomputed": 0, "dtypes": set()}
    original = WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather

    def counting(self, mesh):  # FSDP2 checks the method's signature
        seen["precomputed"] += getattr(self, "_precomputed_scale", None) is not None
        inputs, metadata = original(self, mesh)
        seen["gathers"] += 1
        seen["dtypes"].update(str(t.dtype) for t in inputs)
        return inputs, metadata

    WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather = counting
    leave = os._exit

    def write_then_leave(code: int) -> None:  # a multi-process run leaves by os._exit (scifm/train/entry.py)
        if os.environ["RANK"] == "0":
            args.out.write_text(json.dumps(seen | {"dtypes": sorted(seen["dtypes"])}))
        leave(code)

    os._exit = write_then_leave
    sys.argv = [sys.argv[0], *overrides]
    from scifm.train.entry import hydra_train

    hydra_train()


if __name__ == "__main__":
    main()
