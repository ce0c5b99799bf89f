"""The multi-task experiment (issue 5): base / LoRA / L-MoE variants on the bundled mix, 3 seeds.

    python benchmarks/multitask.py --profile cpu            # resumable: finished runs are skipped
    python benchmarks/multitask.py --methods lmoe lora --seeds 0

Each run writes results/multitask/<method>-seed<k>.json; docs/results.md is generated from them by
benchmarks/multitask_report.py. The logic lives in lmoe/experiment.py.
"""

import sys

from lmoe.experiment import main

if __name__ == "__main__":
    sys.exit(main())
