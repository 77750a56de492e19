"""The research lab: it proves the detector with numbers and is never part of what a user deploys.

SSL pre-training (`ssl`, `clip_training`), attacks and their triggers (`attacks/`), linear probes
(`probe`), decoder-free baselines (`baselines`), detection metrics (`evaluate`), the suites' stages
(`suite`, `clip_suite`), their figures and reports (`results`, `report`, `clip_report`, `figures`),
the runner that joins stages and reports (`runner`), the `dede lab` / `dede demo` commands
(`commands`) and the demo builder (`demo`).

The lab may import every other package of the project; nothing imports the lab (the `dede` command
line finds its commands through the `dede.commands` entry point; tests/core/test_layout.py checks).
"""
