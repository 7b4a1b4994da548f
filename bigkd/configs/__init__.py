"""The bundled configs (`--config configs/NAME.py[:variant]` finds them from any directory)."""
