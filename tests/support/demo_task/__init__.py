"""A demonstration task, ``demo_invert``, added the way every local task is: an engine module
(``engine.py``, its ``ENGINE`` declaration and run function) plus its payload schema
(``payload.py``, ``@payload_for``). ``tests/inference/test_adding_a_task.py`` registers it and runs it."""
