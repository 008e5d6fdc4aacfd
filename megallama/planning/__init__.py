"""The compute-budget planner behind ``tools/plan.py``: memory, step time and cost of a run's
layouts (``memory``, ``step_time``, ``planner``), calibrated from ``bench/results``
(``calibration``), on a table of GPUs (``hardware``), and what serving each size costs
(``inference``)."""
