"""Stages of ``spark_phase4_pipeline.py``.

Each stage module exposes ``NAME`` (the sub-command, e.g. ``"4a"``), ``HELP`` (one line),
``add_arguments(parser)`` (its own flags; the common flags ``--master``, ``--out``,
``--verbose``, ``--config`` are added by the driver) and ``run(args) -> int`` (exit code).
To add a stage, add its module path to :data:`STAGE_MODULES`.
"""

#: sub-command -> module, in the order they are listed by --help
STAGE_MODULES: dict[str, str] = {
    "4a": "injection_pipeline.stages.stage_4a",
    "4b": "injection_pipeline.stages.stage_4b",
    "4b2": "injection_pipeline.stages.stage_4b2",
    "4c": "injection_pipeline.stages.stage_4c",
    "4d": "injection_pipeline.stages.stage_4d",
    "finder": "injection_pipeline.stages.stage_finder",
    "emr-submit": "injection_pipeline.stages.stage_emr",
    "demo": "injection_pipeline.stages.stage_demo",
}
