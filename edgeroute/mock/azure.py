"""A mock of Azure OpenAI's chat completions, on top of the OpenAI mock.

Answers `POST /openai/deployments/{deployment}/chat/completions?api-version=...`
with an `api-key` header: Azure's 401 and 404 bodies for a wrong key, a missing
api-version or an unknown deployment, and its content-filter rejection (400, code
`content_filter`) when the request carries ``x-mock-content-filter``, and its 400 for
`stream_options` under an API version older than the field. Everything
else is the OpenAI mock's answer (Azure speaks OpenAI's format).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from edgeroute.mock import openai as openai_mock
from edgeroute.mock.unreadable import refused_as

STREAM_OPTIONS_SINCE = "2024-09-01-preview"  # Azure's first API version that takes `stream_options`


@dataclass
class MockOptions(openai_mock.MockOptions):
    name: str = "mock-azure"
    # Deployment names that exist (None: any).
    deployments: list[str] | None = None


def azure_error(http_status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"error": {"code": code, "message": message, **extra}}
    return web.Response(status=http_status, body=orjson.dumps(body), content_type="application/json")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    opts: MockOptions = request.app[OPTIONS]
    if opts.api_key is not None and request.headers.get("api-key") != opts.api_key:
        return azure_error(
            401,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
            "for an active subscription and use a correct regional API endpoint for your resource.",
        )
    if "api-version" not in request.query:
        return azure_error(404, "404", "Resource not found")
    deployment = request.match_info["deployment"]
    if opts.deployments is not None and deployment not in opts.deployments:
        return azure_error(404, "DeploymentNotFound", "The API deployment for this resource does not exist.")
    if request.query["api-version"] < STREAM_OPTIONS_SINCE and b'"stream_options"' in await request.read():
        # What Azure answers to a field its API version predates.
        return web.json_response(
            {"error": {"message": "Unrecognized request argument supplied: stream_options",
                       "type": "invalid_request_error", "param": None, "code": None}},
            status=400,
        )  # fmt: skip
    if "x-mock-content-filter" in request.headers:
        return azure_error(
            400,
            "content_filter",
            "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
            param="prompt",
            type=None,
            status=400,
            innererror={
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {"violence": {"filtered": True, "severity": "high"}},
            },
        )
    return await openai_mock.chat_completions(request)


OPTIONS = web.AppKey("azure_options", MockOptions)


def build_app(options: MockOptions | None = None) -> web.Application:
    """The mock as an aiohttp application (Azure's deployment routes)."""
    opts = options or MockOptions()
    app = web.Application(
        client_max_size=64 * 1024 * 1024,
        middlewares=[refused_as(lambda m: azure_error(400, "BadRequest", m))],
    )
    app[OPTIONS] = opts
    # The OpenAI mock answers once Azure's own checks pass; the key was already checked.
    app[openai_mock.OPTIONS] = dataclasses.replace(opts, api_key=None)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", chat_completions)
    return app
