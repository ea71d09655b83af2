"""``python -m dispider_vllm.checkpoint``: the dispider-checkpoint command line."""

from .cli import main

raise SystemExit(main())
