import os
from typing import Any

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
_django = get_wsgi_application()


def application(environ: dict[str, Any], start_response: Any) -> Any:
    """Django's WSGI handler, and a 400 for a Content-Type it cannot parse: Django parses it while
    building the request, before any middleware or error handler, so `image/png; a*=nope''x` (an
    RFC 2231 parameter in an unknown charset) escaped as gunicorn's HTML 500."""
    try:
        return _django(environ, start_response)
    except ValueError:
        from django.utils.http import parse_header_parameters

        try:
            parse_header_parameters(environ.get("CONTENT_TYPE", ""))
        except ValueError:
            from controlplane.errors import problem

            response = problem(400, "malformed_content_type", "The Content-Type header cannot be parsed.")
            response["Content-Length"] = str(len(response.content))
            start_response("400 Bad Request", list(response.items()))
            return [response.content]
        raise
