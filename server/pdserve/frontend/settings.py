"""Triton's trace and log settings (the TraceSetting and LogSettings RPCs, /v2/trace/setting and
/v2/logging over HTTP), held once for both doors.

pdserve does not record request traces: trace settings answer as Triton's do, and may be changed,
but a `trace_level` other than OFF is refused with a message saying so (the metrics and the
server log are what pdserve offers). Log settings act on the server's Python logging: `log_info`,
`log_warning`, `log_error` and `log_verbose_level` set the `pdserve` logger's level; `log_format`
accepts Triton's values; `log_file` can only stay empty (the log goes to stderr).

The gRPC messages are Triton's (protos/grpc_service.proto); frontend/service.py answers the
TraceSetting and LogSettings RPCs from here, as frontend/http_server.py answers /v2/trace/setting.
"""
from __future__ import annotations

import logging

from pdserve.common.errors import Cause, ServeError

TRACE_DEFAULTS = {"trace_file": [""], "trace_level": ["OFF"], "trace_rate": ["1000"], "trace_count": ["-1"],
                  "log_frequency": ["0"], "trace_mode": ["triton"]}
LOG_FORMATS = ("default", "ISO8601")


def _invalid(message: str) -> ServeError:
    return ServeError(Cause.INVALID_ARGUMENT, message)


class Settings:
    def __init__(self, manager=None, logger: logging.Logger | None = None):
        self.manager = manager
        self.logger = logger or logging.getLogger("pdserve")
        self.global_trace = {k: list(v) for k, v in TRACE_DEFAULTS.items()}
        self.model_trace: dict[str, dict[str, list[str]]] = {}
        self.log_settings = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                             "log_verbose_level": 0, "log_format": "default"}

    # ---- trace ---------------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model and self.manager is not None and not self.manager.knows(model):
            raise ServeError(Cause.MODEL_UNKNOWN, f"Request for unknown model: '{model}' is not found")

    def trace(self, model: str = "") -> dict[str, list[str]]:
        self._check_model(model)
        return {**self.global_trace, **self.model_trace.get(model, {})} if model else dict(self.global_trace)

    def update_trace(self, model: str, settings: dict) -> dict[str, list[str]]:
        """settings: name -> list of strings, a string, or None (None: back to the global value)."""
        self._check_model(model)
        target = self.model_trace.setdefault(model, {}) if model else self.global_trace
        for key, value in settings.items():
            if key not in TRACE_DEFAULTS:
                raise _invalid(f"unknown trace setting '{key}'; known: {', '.join(TRACE_DEFAULTS)}")
            if value is None or value == []:
                if model:
                    target.pop(key, None)
                else:
                    target[key] = list(TRACE_DEFAULTS[key])
                continue
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise _invalid(f"trace setting '{key}' must be a string or a list of strings")
            if key == "trace_level" and [v.upper() for v in values] != ["OFF"]:
                raise _invalid(f"trace_level {values} is not supported: pdserve does not record request traces, so "
                               "trace_level can only be OFF; use the Prometheus metrics (pdserve_*, nv_inference_*) "
                               "and the model statistics for timings")
            if key in ("trace_rate", "trace_count", "log_frequency"):
                try:
                    int(values[0])
                except ValueError:
                    raise _invalid(f"trace setting '{key}' is {values[0]!r}; it must be an integer") from None
            target[key] = values
        return self.trace(model)

    # ---- log -----------------------------------------------------------------------------------------
    def log(self) -> dict:
        return dict(self.log_settings)

    def update_log(self, settings: dict) -> dict:
        new = dict(self.log_settings)
        for key, value in settings.items():
            if key not in new:
                raise _invalid(f"unknown log setting '{key}'; known: {', '.join(new)}")
            kind = type(self.log_settings[key])
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise _invalid(f"log setting '{key}' must be a non-negative integer")
            if kind is not int and not isinstance(value, kind):
                raise _invalid(f"log setting '{key}' must be {'true or false' if kind is bool else 'a string'}")
            new[key] = value
        if new["log_file"]:
            raise _invalid("log_file is not supported: pdserve logs to stderr; leave log_file empty and "
                           "redirect the server's output instead")
        if new["log_format"] not in LOG_FORMATS:
            raise _invalid(f"log_format {new['log_format']!r} is unknown; use one of {', '.join(LOG_FORMATS)}")
        self.log_settings = new
        if new["log_verbose_level"] > 0:
            level = logging.DEBUG
        elif new["log_info"]:
            level = logging.INFO
        elif new["log_warning"]:
            level = logging.WARNING
        elif new["log_error"]:
            level = logging.ERROR
        else:
            level = logging.CRITICAL
        self.logger.setLevel(level)
        return self.log()
