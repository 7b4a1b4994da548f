"""The bundled configs (`--config configs/NAME.py[:variant]` finds them from any directory).

Installed as `bigkd.configs` (pyproject.toml); bigkd loads them by path (`bigkd.cli.config_module`).
"""
