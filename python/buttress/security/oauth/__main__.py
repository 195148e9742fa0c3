"""``python -m buttress.security.oauth serve --config FILE --host 127.0.0.1 --port N``: the
development authorization server (see ``devserver``)."""

from __future__ import annotations

import argparse
import sys

from buttress.security.oauth.devserver import create_dev_app, load_dev_config
from buttress.security.tokens import is_loopback_host


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs the development server until interrupted.

    >>> main(["--help"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(
        prog="python -m buttress.security.oauth",
        description="The buttress OAuth 2.0 authorization server, for development.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="Serve the development server: a JSON config, auto-consent, and GET /me.",
    )
    serve.add_argument("--config", required=True, help="the JSON config file")
    serve.add_argument(
        "--host", default="127.0.0.1", help="the loopback address to listen on (127.0.0.1, ::1)"
    )
    serve.add_argument("--port", type=int, default=9000, help="the port to listen on")
    serve.add_argument("--log-level", default="info", help="uvicorn's log level")
    args = parser.parse_args(argv)

    if not is_loopback_host(args.host):
        # Anyone who can reach the server could mint tokens as the auto-approved user.
        print(
            f"error: --host must be a loopback address such as 127.0.0.1 (got {args.host}): "
            "the development server approves every authorization request as the development "
            "user, so it must not be reachable from other machines.",
            file=sys.stderr,
        )
        return 2
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 literal
    try:
        config = load_dev_config(args.config)
        app = create_dev_app(config, default_issuer=f"http://{host}:{args.port}")
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import uvicorn

    server = app.state.oauth_server
    print(
        f"buttress OAuth development server: issuer {server.issuer}, metadata at "
        f"{server.metadata_url}. It approves every request as the development user; never "
        "run it in production.",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
