"""Google Gemini (`models/{model}:generateContent`, `:streamGenerateContent?alt=sse`).

Maps system prompts (`systemInstruction`), roles (assistant → `model`), text and
image parts (data URLs → `inlineData`, http(s) URLs → `fileData`), tools
(`functionDeclarations` with JSON Schema parameters), tool results
(`functionResponse`, named from the call they answer), tool_choice
(`functionCallingConfig`), JSON mode (`responseMimeType`, `responseJsonSchema`),
max_tokens, temperature, top_p, stop, seed and the penalties. Safety blocks, of the
prompt or of the answer, end with finish_reason `content_filter`; usage counts cached
tokens (`cachedContentTokenCount`) and thoughts as reasoning tokens. `n` > 1,
logprobs and logit_bias follow the `unsupported_params` rule.

Options: `unsupported_params` (`reject` | `drop`).
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from edgeroute.outcome import Outcome
from edgeroute.providers import answer_fields as fields
from edgeroute.providers import openai_format as oa
from edgeroute.providers.base import Adapter, UpstreamRequest
from edgeroute.providers.error_fields import ErrorFields

_SUPPORTED = oa.COMMON_PARAMS | {"frequency_penalty", "presence_penalty", "seed"}

_FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "MODEL_ARMOR",
        "LANGUAGE",
    }
)

# Google's canonical error status → the routing meaning of the failure.
_STATUS_CLASS = {
    "RESOURCE_EXHAUSTED": Outcome.RATE_LIMITED,
    "UNAVAILABLE": Outcome.SERVER_ERROR,
    "INTERNAL": Outcome.SERVER_ERROR,
    "UNKNOWN": Outcome.SERVER_ERROR,
    "DEADLINE_EXCEEDED": Outcome.TIMEOUT,
}


# The HTTP status of a Google RPC status, for an error chunk without its `code`.
_STATUS_HTTP = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def finish_reason(reason: str | None, has_calls: bool) -> str:
    if reason in _FILTERED:
        return "content_filter"
    if reason == "MAX_TOKENS":
        return "length"
    return "tool_calls" if has_calls else "stop"


def openai_usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    """Gemini's usage in OpenAI's terms; None (the answer is counted) without its prompt count or
    any output count (Gemini leaves `candidatesTokenCount` out of an answer without text, which
    counting finds empty too)."""
    counts = oa.token_counts(
        u,
        ("promptTokenCount",),
        ("candidatesTokenCount", "thoughtsTokenCount", "toolUsePromptTokenCount", "cachedContentTokenCount"),
    )
    if counts is None or not isinstance(u, dict) or ("candidatesTokenCount" not in u and "thoughtsTokenCount" not in u):
        return None
    prompt, candidates, thoughts, tool_prompt, cached = counts
    return oa.usage(prompt + tool_prompt, candidates + thoughts, min(cached, prompt), thoughts)


def _image_part(url: str) -> dict[str, Any]:
    data = oa.parse_data_url(url)
    if data is not None:
        return {"inlineData": {"mimeType": data[0], "data": data[1]}}
    if url.startswith(("http://", "https://", "gs://")):
        mime = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    raise oa.bad_request("Image URLs must be data:, http(s): or gs: URLs.", "messages")


def _parts(content: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in oa.content_parts(content):
        if part["type"] == "text":
            out.append({"text": part["text"]})
        elif part["type"] == "image_url":
            out.append(_image_part(oa.image_url_of(part) or ""))
        elif part.get("refusal"):
            out.append({"text": part["refusal"]})
    return out


def _tool_response(content: Any) -> dict[str, Any]:
    """A tool result as a `functionResponse.response` object (Gemini wants an object)."""
    text = content if isinstance(content, str) else oa.text_of(content, "tool messages")
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"content": text}


def convert_messages(messages: list[Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(systemInstruction, contents); consecutive same-role turns are merged."""
    system: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    turns = oa.Turns("parts")
    add = turns.add
    for role, m in oa.each_message(messages):
        if role == "system":
            text = oa.text_of(m.get("content"), "system messages")
            if text:
                system.append({"text": text})
        elif role == "user":
            add("user", _parts(m.get("content")))
        elif role == "assistant":
            parts = _parts(m.get("content"))
            for call in m.get("tool_calls") or ():
                name = oa.tool_name(call)
                names[str(call.get("id"))] = name
                parts.append({"functionCall": {"name": name, "args": oa.tool_arguments(call)}})
            add("model", parts)
        elif role == "tool":
            call_id = str(m.get("tool_call_id"))
            if call_id not in names:
                raise oa.bad_request("A tool message must answer a tool call of an earlier message.", "messages")
            response = {"name": names[call_id], "response": _tool_response(m.get("content"))}
            add("user", [{"functionResponse": response}])
    return ({"parts": system} if system else None), turns.turns


class GeminiAdapter(Adapter):
    answer_keys = ("candidates", "promptFeedback")  # a blocked prompt has no candidate

    def build(self, model: str, body: bytes, stream: bool) -> UpstreamRequest:
        req = oa.parse_request(body)
        rule = oa.unsupported_rule(self.provider.options)
        oa.apply_param_rule(req, _SUPPORTED, rule, self.name)
        system, contents = convert_messages(req["messages"])
        out: dict[str, Any] = {"contents": contents}
        if system:
            out["systemInstruction"] = system
        gen: dict[str, Any] = {}
        max_tokens = oa.max_tokens_of(req)
        if max_tokens is not None:
            gen["maxOutputTokens"] = max_tokens
        for ours, theirs in (
            ("temperature", "temperature"),
            ("top_p", "topP"),
            ("presence_penalty", "presencePenalty"),
            ("frequency_penalty", "frequencyPenalty"),
        ):
            if (value := oa.sampling(req, ours)) is not None:
                gen[theirs] = value
        if req.get("seed") is not None:
            if type(req["seed"]) is not int:
                raise oa.bad_request("`seed` must be an integer.", "seed")
            gen["seed"] = req["seed"]
        stop = oa.stop_list(req)
        if stop:
            gen["stopSequences"] = stop
        fmt, schema = oa.response_format_of(req)
        if fmt != "text":
            gen["responseMimeType"] = "application/json"
            if fmt == "json_schema":
                gen["responseJsonSchema"] = schema
        if gen:
            out["generationConfig"] = gen
        tools = oa.function_tools(req)
        if tools:
            decls = []
            for t in tools:
                d: dict[str, Any] = {"name": t["name"], "parametersJsonSchema": t["parameters"]}
                if t["description"]:
                    d["description"] = t["description"]
                decls.append(d)
            out["tools"] = [{"functionDeclarations": decls}]
        tc = oa.tool_choice_of(req)
        if tc is not None and tools:
            kind, name = tc
            mode = {"auto": "AUTO", "none": "NONE", "required": "ANY", "function": "ANY"}[kind]
            cfg: dict[str, Any] = {"mode": mode}
            if name:
                cfg["allowedFunctionNames"] = [name]
            out["toolConfig"] = {"functionCallingConfig": cfg}
        method = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
        headers = {"Content-Type": "application/json", **self.provider.headers}
        if self.api_key is not None:
            headers["x-goog-api-key"] = self.api_key.reveal()
        url = f"{self.provider.base_url}/models/{model}{method}"
        return UpstreamRequest(url, headers, orjson.dumps(out))

    def judge(self, status: int, err: ErrorFields, headers: Mapping[str, str]) -> Outcome:
        if "API_KEY_INVALID" in err.reasons:  # our key, in a 400 INVALID_ARGUMENT
            return Outcome.AUTH_ERROR
        cls = _STATUS_CLASS.get(err.status)
        if cls is not None:
            return cls
        # No reason is given for a prompt too long: "The input token count (N) exceeds ...".
        if status == 400 and err.says("the input token count"):
            return Outcome.CONTEXT_WINDOW
        return super().judge(status, err, headers)

    def translate_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        try:
            cand = _candidate(obj)
            reply = oa.Reply()
            if cand is not None:
                for part in _answer_parts(cand):
                    if isinstance(part, str):
                        reply.text.append(part)
                    else:
                        call_id, name, args = part
                        reply.tool_use(call_id, name, args)
                reason = _finish(cand)
                if reason is None and cand.get("content") is None:
                    # Neither an answer nor why there is none (a blocked answer says SAFETY).
                    raise fields.Unreadable(f"sent {_ANSWER} whose candidate has neither content nor a finishReason")
                finish = finish_reason(reason, bool(reply.calls))
            elif fields.obj(obj.get("promptFeedback"), _ANSWER, "promptFeedback").get("blockReason"):
                finish = "content_filter"  # the prompt itself was blocked: no candidate at all
            else:
                raise fields.Unreadable(f"sent {_ANSWER} with no candidate and no promptFeedback.blockReason")
        except fields.Unreadable as e:
            raise fields.said(f"provider {self.name}", e) from None
        return reply.completion(
            _name(obj.get("responseId")) or oa.new_id(),
            _name(obj.get("modelVersion")),
            finish,
            openai_usage(obj.get("usageMetadata")),
        )

    def stream_translator(self, model: str, include_usage: bool = False) -> GeminiStream:
        return GeminiStream(model, include_usage)

    def health_url(self) -> str:
        return self.provider.base_url + "/models"

    def health_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.api_key.reveal()} if self.api_key else {}


class GeminiStream(oa.SseJsonStream):
    """Gemini's SSE `GenerateContentResponse`s → OpenAI chunks.

    Gemini sends text as deltas and each function call whole, and has no end event:
    the response with a finishReason (or a blocked prompt) is the last, so it closes
    the OpenAI stream with the finish chunk, the usage chunk and `[DONE]`.
    """

    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__(model, include_usage)
        self.has_calls = False

    def on_event(self, obj: dict[str, Any]) -> bytes:
        try:
            return self._event(obj)
        except fields.Unreadable as e:
            raise fields.said(f"model {self.out.model}", e) from None

    def _event(self, obj: dict[str, Any]) -> bytes:
        w = self.out
        err = obj.get("error")
        if type(err) is dict or err:
            return _error_event(err)
        if model := _name(obj.get("modelVersion")):
            w.model = model
        if obj.get("usageMetadata"):
            w.usage = openai_usage(obj["usageMetadata"])
        out = [w.start()]  # joined once: an event of many parts must not be quadratic
        cand = _candidate(obj)
        if cand is None:
            if fields.obj(obj.get("promptFeedback"), _ANSWER, "promptFeedback").get("blockReason"):
                return b"".join((*out, w.finish("content_filter"), w.end()))
            return out[0]
        for part in _answer_parts(cand):
            if isinstance(part, str):
                out.append(w.text(part))
            else:
                call_id, name, args = part
                self.has_calls = True
                text = args if isinstance(args, str) and args else orjson.dumps(args or {}).decode()  # as `oa.Reply`
                out.append(w.tool_head(w.new_tool(), call_id, name, text))
        if reason := _finish(cand):
            out += (w.finish(finish_reason(reason, self.has_calls)), w.end())
        return b"".join(out)


_ANSWER = "a Gemini answer"  # a stream's chunk is one too (a whole GenerateContentResponse)


def _name(value: Any) -> str:
    """An answer's id or model version: one that is not a string is not shown (the request's own is)."""
    return value if type(value) is str else ""


def _candidate(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The answer's first candidate; None when there is none (a blocked prompt, a chunk of usage)."""
    cands = fields.objects(obj.get("candidates"), _ANSWER, "candidates")
    return cands[0] if cands else None


def _finish(cand: dict[str, Any]) -> str | None:
    return fields.maybe_text(cand.get("finishReason"), _ANSWER, "candidates[0].finishReason")


Part = str | tuple[str, str, Any]


def _answer_parts(cand: dict[str, Any]) -> Iterator[Part]:
    """A candidate's text (a string) and function calls ((id, name, args)), in order; thoughts left out."""
    content = fields.obj(cand.get("content"), _ANSWER, "candidates[0].content")
    for part in fields.objects(content.get("parts"), _ANSWER, "candidates[0].content.parts"):
        if part.get("thought"):
            continue
        if "text" in part:
            yield fields.text(part["text"], _ANSWER, "parts[].text")
        elif "functionCall" in part:
            fc = part["functionCall"]
            if type(fc) is not dict:  # null too: a call of nothing
                raise fields.fail(_ANSWER, "parts[].functionCall", "an object")
            args = fc.get("args")
            if args is not None and type(args) is not dict and type(args) is not str:
                raise fields.fail(_ANSWER, "parts[].functionCall.args", "an object")
            call_id = fields.text(fc.get("id"), _ANSWER, "parts[].functionCall.id") or oa.new_id("call_")
            yield call_id, fields.text(fc.get("name"), _ANSWER, "parts[].functionCall.name"), args


def _error_event(err: Any) -> bytes:
    """Gemini's error chunk as an error event of its class (`oa.status_error_event`)."""
    if type(err) is not dict:  # a careless server's `"error": "quota exceeded"`: a server error
        return oa.status_error_event(err if type(err) is str else "upstream error", 500, "UNKNOWN")
    status = err.get("status")
    status = status if type(status) is str and status else "UNKNOWN"
    code = err.get("code")
    if type(code) is str and code.isdigit():
        code = int(code)
    http = code if type(code) is int and 400 <= code <= 599 else _STATUS_HTTP.get(status, 500)
    message = err.get("message")
    return oa.status_error_event(message if type(message) is str and message else "upstream error", http, status)
