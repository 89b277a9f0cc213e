"""Security headers that Django does not set itself."""

# Everything LanHub serves comes from its own origin (whitenoise); no CDN, no inline script.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        # The admin ships inline scripts of its own; give it the policy it needs and nothing more.
        if request.path.startswith("/admin/"):
            admin_csp = CSP.replace("script-src 'self'", "script-src 'self' 'unsafe-inline'")
            response.setdefault("Content-Security-Policy", admin_csp)
        else:
            response.setdefault("Content-Security-Policy", CSP)
        return response
