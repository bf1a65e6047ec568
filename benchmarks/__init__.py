"""Standalone measurements, run from the repository root as ``python -m benchmarks.NAME``.

Each module's docstring gives its command. They report ratios measured in one run (over the
matmul peak of :mod:`training.measure`, over another variant), never absolute targets.

Training: ``training_peers`` (ours in float32 and bfloat16 against PyTorch), ``input_pipeline``,
``mirrored_overhead``, ``shard_overlap`` and ``multi_worker_resume`` (checks of multi-worker
runs), ``backup_cost``, ``randaugment_check`` (our RandAugment against torchvision's),
``peer_recipe`` (the reference CIFAR-10 recipe in PyTorch, on the same data as ours).
Inference and export: ``inference_peers`` (against ONNX Runtime and PyTorch),
``tflite_breakdown``, ``int8_quality``, ``int8_layers``, ``edge_targets`` (Vela, TFLite Micro).
Helpers: ``models`` (shared models); ``peer_models``, ``peer_training`` and ``peer_randaugment``
run in the peers' environment (``requirements-bench.txt``, ``--peers-python``).
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
