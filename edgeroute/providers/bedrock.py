"""AWS Bedrock's Converse API (`/model/{id}/converse`, `/model/{id}/converse-stream`); the
embeddings models' InvokeModel requests are signed here too (`model_request`).

Requests are signed with SigV4 by botocore's signer, or carry a Bedrock API key as a
bearer token. Maps system prompts, text and base64 images (Bedrock cannot fetch
URLs), tools (`toolSpec` with a JSON schema) and tool results, tool_choice
(auto/any/tool; `none` by leaving the tools out when the history has no tool turns),
JSON mode (a forced tool whose call becomes the text answer), max_tokens,
temperature, top_p and stop. The stream is AWS's binary event-stream
(`application/vnd.amazon.eventstream`), decoded by botocore's parser. Usage counts
cache reads and writes as prompt tokens, cache reads as cached tokens.

Options: `region` (else taken from the base_url host), `aws_access_key_id`,
`aws_secret_access_key`, `aws_session_token` (secret references, as `api_key`;
without them botocore's default credential chain is used), `auth: api_key` to send
the provider's `api_key` as a Bedrock API key instead, `unsupported_params`.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

import orjson
import yarl
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from botocore.eventstream import EventStreamBuffer, ParserError

from edgeroute import redact, secrets
from edgeroute.errors import ProxyError
from edgeroute.outcome import Outcome
from edgeroute.providers import answer_fields as fields
from edgeroute.providers import openai_format as oa
from edgeroute.providers.base import Adapter, UpstreamRequest
from edgeroute.providers.error_fields import ErrorFields

_SUPPORTED = oa.COMMON_PARAMS
# How long a provider found without AWS credentials is taken to have none: the lookup (the
# environment, files, the instance metadata service: up to seconds where that does not answer)
# runs on the event loop as each request is built, and every request and `/v1/route/explain`
# on a route with such a deployment builds one for it.
NO_CREDENTIALS_S = 30.0

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}

# AWS error types (x-amzn-ErrorType, exception events) → the routing meaning.
_ERROR_CLASS = {
    "throttlingexception": Outcome.RATE_LIMITED,
    "servicequotaexceededexception": Outcome.RATE_LIMITED,
    "modelnotreadyexception": Outcome.RATE_LIMITED,
    "serviceunavailableexception": Outcome.SERVER_ERROR,
    "internalserverexception": Outcome.SERVER_ERROR,
    "modelerrorexception": Outcome.SERVER_ERROR,
    "modelstreamerrorexception": Outcome.SERVER_ERROR,
    "modeltimeoutexception": Outcome.TIMEOUT,
}


# The HTTP status each exception an event stream may end with stands for (its frame names it
# camel-cased, `throttlingException`); any other is a server error. A model's own failure mid-stream
# (`modelStreamErrorException`, HTTP 424) is the deployment's, never the request's.
_EXCEPTION_STATUS = {
    "throttlingexception": 429,
    "servicequotaexceededexception": 429,
    "modelnotreadyexception": 429,
    "serviceunavailableexception": 503,
    "validationexception": 400,
    "accessdeniedexception": 403,
    "resourcenotfoundexception": 404,
    "modeltimeoutexception": 504,
}


def openai_usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    """Bedrock's usage in OpenAI's terms; None (the answer is counted) without its input and output counts."""
    counts = oa.token_counts(u, ("inputTokens", "outputTokens"), ("cacheReadInputTokens", "cacheWriteInputTokens"))
    if counts is None:
        return None
    given, output, cached, written = counts
    return oa.usage(given + cached + written, output, cached, cache_write=written)


def _image(url: str) -> dict[str, Any]:
    data = oa.parse_data_url(url)
    if data is None:
        raise oa.bad_request("Bedrock accepts images only as base64 data URLs.", "messages")
    fmt = _IMAGE_FORMATS.get(data[0])
    if fmt is None:
        raise oa.bad_request(f"Bedrock does not accept images of type {data[0]}.", "messages")
    return {"image": {"format": fmt, "source": {"bytes": data[1]}}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in oa.content_parts(content):
        if part["type"] == "text":
            out.append({"text": part["text"]})
        elif part["type"] == "image_url":
            out.append(_image(oa.image_url_of(part) or ""))
        elif part.get("refusal"):
            out.append({"text": part["refusal"]})
    return out


def convert_messages(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """(system, messages, whether the history holds tool turns); same-role turns merged."""
    system: list[dict[str, Any]] = []
    has_tools = False
    turns = oa.Turns()
    add = turns.add
    for role, m in oa.each_message(messages):
        if role == "system":
            text = oa.text_of(m.get("content"), "system messages")
            if text:
                system.append({"text": text})
        elif role == "user":
            add("user", _blocks(m.get("content")))
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for call in m.get("tool_calls") or ():
                has_tools = True
                use = {"toolUseId": call.get("id"), "name": oa.tool_name(call), "input": oa.tool_arguments(call)}
                blocks.append({"toolUse": use})
            add("assistant", blocks)
        elif role == "tool":
            has_tools = True
            content = m.get("content")
            text = content if isinstance(content, str) else oa.text_of(content, "tool messages")
            result = {"toolUseId": m.get("tool_call_id"), "content": [{"text": text}]}
            add("user", [{"toolResult": result}])
    return system, turns.turns, has_tools


def _region_of(base_url: str) -> str | None:
    host = urllib.parse.urlsplit(base_url).hostname or ""
    parts = host.split(".")
    return parts[1] if len(parts) > 2 and parts[0].startswith("bedrock") else None


class BedrockAdapter(Adapter):
    answer_keys = ("output",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opts = self.provider.options
        self.region = str(opts.get("region") or _region_of(self.provider.base_url) or "us-east-1")
        self.use_api_key = opts.get("auth") == "api_key"
        self._credentials: Credentials | None = None
        self._none_until = 0.0  # monotonic time until which none are looked for (`NO_CREDENTIALS_S`)
        self._registered_token: str | None = ""  # the session token of the last set given to `redact`
        # Configured credentials stay references: a `file:`/`exec:` one is kept current by the
        # secrets' refresh (an agent rewriting short-lived STS credentials), read per request.
        self._configured: tuple[secrets.Secret, secrets.Secret, secrets.Secret | None] | None = None
        self._configured_at: tuple[int, ...] = ()  # the secrets' versions `_configured_frozen` was built at
        self._configured_frozen: ReadOnlyCredentials | None = None
        if "aws_access_key_id" in opts:
            token = opts.get("aws_session_token")
            self._configured = (
                secrets.resolve(str(opts["aws_access_key_id"])),
                secrets.resolve(str(opts.get("aws_secret_access_key", ""))),
                secrets.resolve(str(token)) if token else None,
            )

    def _configured_credentials(self) -> ReadOnlyCredentials | None:
        """The configured credentials as they are now (the secrets register their new values)."""
        if self._configured is None:
            return None
        at = tuple(s.version for s in self._configured if s is not None)
        if self._configured_frozen is None or at != self._configured_at:
            key_id, secret, token = self._configured
            self._configured_frozen = ReadOnlyCredentials(
                key_id.reveal(), secret.reveal(), token.reveal() if token is not None else None
            )
            self._configured_at = at
        return self._configured_frozen

    def _frozen_credentials(self) -> ReadOnlyCredentials:
        configured = self._configured_credentials()
        if configured is not None:
            return configured
        if self._credentials is None:
            import botocore.session

            now = time.monotonic()
            found = None if now < self._none_until else botocore.session.get_session().get_credentials()
            if found is None:
                self._none_until = max(self._none_until, now + NO_CREDENTIALS_S)
                raise ProxyError(
                    502,
                    f"No AWS credentials are configured for provider '{self.name}'.",
                    code="provider_misconfigured",
                )
            self._credentials = found
        frozen = self._credentials.get_frozen_credentials()
        if frozen.token != self._registered_token:
            # The chain's credentials (environment, profile, a role's) come from no reference
            # of ours, and a role's are replaced as they expire: each set is a secret as soon
            # as it is first used, so an upstream quoting the headers back quotes no token.
            for value in (frozen.access_key, frozen.secret_key, frozen.token):
                redact.register(value or "")
            self._registered_token = frozen.token
        return frozen

    def _signed(self, url: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        if self.use_api_key:
            if self.api_key is not None:
                headers["Authorization"] = f"Bearer {self.api_key.reveal()}"
            return headers
        req = AWSRequest(method="POST", url=url, data=body, headers=headers)
        SigV4Auth(self._frozen_credentials(), "bedrock", self.region).add_auth(req)
        return dict(req.headers.items())

    def build(self, model: str, body: bytes, stream: bool) -> UpstreamRequest:
        req = oa.parse_request(body)
        rule = oa.unsupported_rule(self.provider.options)
        oa.apply_param_rule(req, _SUPPORTED, rule, self.name)
        system, messages, history_tools = convert_messages(req["messages"])
        out: dict[str, Any] = {"messages": messages}
        if system:
            out["system"] = system
        inf: dict[str, Any] = {}
        max_tokens = oa.max_tokens_of(req)
        if max_tokens is not None:
            inf["maxTokens"] = max_tokens
        if (temperature := oa.sampling(req, "temperature")) is not None:
            if temperature > 1:
                oa.unsupported_value("temperature", "the range is 0 to 1", rule, self.name)
            else:
                inf["temperature"] = temperature
        if (top_p := oa.sampling(req, "top_p")) is not None:
            inf["topP"] = top_p
        stop = oa.stop_list(req)
        if stop:
            inf["stopSequences"] = stop
        if inf:
            out["inferenceConfig"] = inf
        tool_config = self._tool_config(req, rule, history_tools)
        if tool_config:
            out["toolConfig"] = tool_config
        action = "converse-stream" if stream else "converse"
        accept = "application/vnd.amazon.eventstream" if stream else "application/json"
        return self.model_request(model, action, orjson.dumps(out), accept)

    def model_request(self, model: str, action: str, data: bytes, accept: str = "application/json") -> UpstreamRequest:
        """A signed `POST /model/{model}/{action}` (`converse`, `converse-stream`, `invoke`)."""
        # Sign exactly the URL aiohttp will send (yarl normalises percent-escapes).
        url = str(yarl.URL(f"{self.provider.base_url}/model/{urllib.parse.quote(model, safe='')}/{action}"))
        headers = {"Content-Type": "application/json", **self.provider.headers, "Accept": accept}
        return UpstreamRequest(url, self._signed(url, data, headers), data)

    def _tool_config(self, req: dict[str, Any], rule: oa.UnsupportedRule, history_tools: bool) -> dict[str, Any] | None:
        tools = [
            {
                "toolSpec": {
                    "name": t["name"],
                    **({"description": t["description"]} if t["description"] else {}),
                    "inputSchema": {"json": t["parameters"]},
                }
            }
            for t in oa.function_tools(req)
        ]
        choice: dict[str, Any] | None = None
        tc = oa.tool_choice_of(req)
        if tc is not None and tools:
            kind, name = tc
            if kind == "none":
                if not history_tools:
                    return None  # no tools offered is how Bedrock says "none"
                oa.unsupported_value("tool_choice", "`none` with tool turns in the conversation", rule, self.name)
            elif kind == "auto":
                choice = {"auto": {}}
            elif kind == "required":
                choice = {"any": {}}
            else:
                choice = {"tool": {"name": name}}
        fmt, schema = oa.response_format_of(req)
        if fmt != "text":
            if tools:
                oa.unsupported_value("response_format", "JSON mode cannot be combined with tools", rule, self.name)
            else:
                spec = {"name": oa.JSON_TOOL, "description": "Respond with the answer as JSON."}
                tools = [{"toolSpec": {**spec, "inputSchema": {"json": schema or {"type": "object"}}}}]
                choice = {"tool": {"name": oa.JSON_TOOL}}
        if not tools:
            return None
        return {"tools": tools, **({"toolChoice": choice} if choice else {})}

    def judge(self, status: int, err: ErrorFields, headers: Mapping[str, str]) -> Outcome:
        # The exception's name: the x-amzn-ErrorType header ("ThrottlingException:http://..."),
        # the body's `__type`, or an in-stream exception frame's (its `code`); else the message's
        # opening word ("ThrottlingException: ..."), never a name quoted inside it.
        name = headers.get("x-amzn-ErrorType", "").partition(":")[0] or err.type or err.code
        cls = _ERROR_CLASS.get(name.lower())
        if cls is None:
            cls = next((c for n, c in _ERROR_CLASS.items() if err.message.startswith(n)), None)
        if cls is not None:
            return cls
        said = err.message.removeprefix("the model returned the following errors: ")
        if status == 400 and said.startswith(("input is too long", "too many input tokens", "prompt is too long")):
            return Outcome.CONTEXT_WINDOW
        if status == 400 and said.startswith("your request exceeds the service quota"):
            return Outcome.RATE_LIMITED
        if status == 424:
            return Outcome.SERVER_ERROR
        return super().judge(status, err, headers)

    def translate_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        reply = oa.Reply()
        try:
            message = fields.obj(
                fields.obj(obj.get("output"), _ANSWER, "output").get("message"), _ANSWER, "output.message"
            )
            content = message.get("content")
            if content is None:  # no content at all (not an empty list): no answer was given
                raise fields.fail(_ANSWER, "output.message.content", "a list of objects")
            for block in fields.objects(content, _ANSWER, "output.message.content"):
                if "text" in block:
                    reply.text.append(fields.text(block["text"], _ANSWER, "content[].text"))
                elif "toolUse" in block:
                    call_id, name, args = _tool_use(block["toolUse"], _ANSWER)
                    reply.tool_use(call_id, name, args)
            reason = obj.get("stopReason")
            if type(reason) is not str:  # Converse always says why it stopped: a cut answer has no `stop`
                raise fields.fail(_ANSWER, "stopReason", "a string")
        except fields.Unreadable as e:
            raise fields.said(f"provider {self.name}", e) from None
        model = obj.get("model")
        return reply.completion(
            oa.new_id(), model if type(model) is str else "", FINISH.get(reason, "stop"), openai_usage(obj.get("usage"))
        )

    def stream_translator(self, model: str, include_usage: bool = False) -> BedrockStream:
        return BedrockStream(model, include_usage)


class BedrockStream:
    """Bedrock's event-stream frames → OpenAI chunks.

    Order on the wire: messageStart, (contentBlockStart for tool use,)
    contentBlockDelta..., contentBlockStop, ..., messageStop (stop reason), metadata
    (usage): the finish chunk goes out at messageStop, usage and `[DONE]` at metadata.
    """

    def __init__(self, model: str, include_usage: bool) -> None:
        self.out = oa.ChunkWriter(model, include_usage)
        self.frames = EventStreamBuffer()
        self.blocks: dict[int, tuple[str, int]] = {}  # block index → ("tool" | "json", tool index)
        self.args_seen: set[int] = set()
        self.json_mode = False
        self.failed = False
        self.message = False  # its messageStart came

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.out.usage

    def feed(self, chunk: bytes) -> bytes:
        if self.failed:
            return b""
        self.frames.add_data(chunk)
        out: list[bytes] = []  # joined once: many frames fed at once must not be quadratic
        try:
            for msg in self.frames:
                if self.out.done:  # ended: what follows (another answer) is not read
                    break
                headers = msg.headers
                if headers.get(":message-type") == "event":
                    out.append(self._event(str(headers.get(":event-type")), _payload(msg.payload)))
                else:
                    out.append(_exception_event(headers, msg.payload))
        except ParserError:
            self.failed = True
            out.append(oa.error_event("upstream sent a malformed event-stream frame", "upstream_error"))
        except fields.Unreadable as e:
            self.failed = True
            raise fields.said(f"model {self.out.model}", e) from None
        return b"".join(out)

    def _event(self, kind: str, ev: dict[str, Any]) -> bytes:
        w = self.out
        if kind == "messageStart":
            if self.message:  # two answers spliced in one stream: the upstream's protocol error
                return w.spliced()
            self.message = True
            return w.start()
        if kind == "contentBlockStart":
            idx = fields.index(ev.get("contentBlockIndex"), _EVENT, "contentBlockIndex")
            use = fields.obj(ev.get("start"), _EVENT, "start").get("toolUse")
            if use is None:
                return b""
            call_id, name, _ = _tool_use(use, _EVENT)
            if name == oa.JSON_TOOL:
                self.blocks[idx] = ("json", -1)
                self.json_mode = True
                return b""
            ti = w.new_tool()
            self.blocks[idx] = ("tool", ti)
            return w.tool_head(ti, call_id, name)
        if kind == "contentBlockDelta":
            idx = fields.index(ev.get("contentBlockIndex"), _EVENT, "contentBlockIndex")
            delta = fields.obj(ev.get("delta"), _EVENT, "delta")
            if "text" in delta:
                return w.text(fields.text(delta["text"], _EVENT, "delta.text"))
            if "toolUse" in delta:
                frag = fields.text(fields.obj(delta["toolUse"], _EVENT, "delta.toolUse").get("input"), _EVENT, "input")
                what, ti = self.blocks.get(idx, ("", -1))
                if frag:
                    self.args_seen.add(idx)
                return w.text(frag) if what == "json" else w.tool_args(ti, frag)
            return b""  # reasoningContent and citations have no OpenAI equivalent
        if kind == "contentBlockStop":
            idx = fields.index(ev.get("contentBlockIndex"), _EVENT, "contentBlockIndex")
            what, ti = self.blocks.get(idx, ("", -1))
            if what and idx not in self.args_seen:
                return w.tool_args(ti, "{}") if what == "tool" else w.text("{}")
            return b""
        if kind == "messageStop":
            reason = ev.get("stopReason")
            if type(reason) is not str:  # Converse always says why it stopped: a cut answer has no `stop`
                raise fields.fail(_EVENT, "stopReason", "a string")
            return w.finish("stop" if self.json_mode and reason == "tool_use" else FINISH.get(reason, "stop"))
        if kind == "metadata":
            w.usage = openai_usage(ev.get("usage"))
            return w.finish("stop") + w.end()
        return b""


_ANSWER = "a Bedrock Converse answer"
_EVENT = "a Bedrock stream event"


def _tool_use(use: Any, what: str) -> tuple[str, str, Any]:
    """A `toolUse` block's (id, name, input); its input is read as `oa.Reply.tool_use` reads it."""
    if type(use) is not dict:  # null too: a call of nothing
        raise fields.fail(what, "toolUse", "an object")
    name = fields.text(use.get("name"), what, "toolUse.name")
    args = use.get("input")
    if args is not None and type(args) is not dict and type(args) is not str:  # no call's arguments
        raise fields.fail(what, "toolUse.input", "an object")
    return fields.text(use.get("toolUseId"), what, "toolUse.toolUseId"), name, args


def _payload(data: bytes) -> dict[str, Any]:
    """An event frame's JSON object (an empty payload: an empty one)."""
    if not data:
        return {}
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise fields.Unreadable("sent a Bedrock stream event that is not JSON") from None
    if type(payload) is not dict:
        raise fields.Unreadable("sent a Bedrock stream event that is not a JSON object")
    return payload


def _exception_event(headers: Mapping[str, Any], data: bytes) -> bytes:
    """An exception frame as an error event of its class (`oa.status_error_event`), its name as the code."""
    kind = str(headers.get(":exception-type") or headers.get(":error-code") or "upstream_error")
    try:
        payload = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        payload = None
    message = payload.get("message") if type(payload) is dict else None
    if type(message) is not str or not message:
        message = str(headers.get(":error-message") or kind)
    return oa.status_error_event(message, _EXCEPTION_STATUS.get(kind.lower(), 500), kind)
