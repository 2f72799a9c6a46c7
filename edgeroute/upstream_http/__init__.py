"""The HTTP/1.1 client for calls to providers: one keep-alive connection pool per provider.

Why not aiohttp's client: on the request hot path it cost about a third of the event
loop's CPU (header preparation, `request_info`, auto headers, `ClientResponse` and its
stream machinery), most of it for features the proxy never uses (cookies, redirects,
compression, proxies, multipart). This client does only what the proxy needs: POST and
GET with an in-memory body, identity response bodies (no `Accept-Encoding` is sent),
one request at a time per connection, on an `asyncio.Protocol` with the responses
parsed by httptools (llhttp, the parser uvicorn uses).

What it keeps:

- at most `limit` connections per client (open or opening); beyond it requests wait
  for one to come back or close;
- a connection goes back to the pool only once its whole response has arrived and the
  response allowed keep-alive; one the peer closed is never reused, and one idle for
  longer than `keepalive_timeout` is closed;
- a request that fails on a *reused* connection before any response byte arrived, and
  within `stale_window` seconds of being written (the peer closed it while idle, and we
  wrote before seeing the FIN), is sent again, once, on a new connection: a stale
  pooled connection is not an upstream failure. A later close may come from an
  upstream that was already working on the request; sending it again could run (and
  bill) it twice, so that is an UpstreamError for the caller's retry policy;
- streamed bytes are handed to the reader as they arrive, one read per body piece,
  never held back to be merged; reading from the socket pauses while a reader lets
  more than a high-water mark of bytes pile up;
- every transport failure (connect refused or reset, peer gone mid-body, malformed
  response) raises :class:`UpstreamError`, an `OSError`; a connect timeout raises
  :class:`UpstreamConnectTimeout`, which is also a `TimeoutError`.

Who owns what: `client` the pool (`HttpClient`: limits, idle connections, the one resend
of a stale request), `connection` one connection (the protocol and the parser's
callbacks), `response` the body as it arrives (`Response`: flow control, release and
drain), `wire` a request as bytes, `tls` the verifying contexts, `errors` what a failure
raises. Callers import from those modules; this package re-exports nothing.
"""
