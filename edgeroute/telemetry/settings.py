"""The config sections of telemetry: logging, tracing and alerts (schema only).

Imports nothing of edgeroute, so that the config package can import it.
"""

from __future__ import annotations

from typing import Literal

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
