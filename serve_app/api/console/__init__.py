"""The web console's assets and charts; its pages are serve_app/api/console/pages.py, a thin,
server-rendered view over the admin and usage data the API already serves (no script, no
CDN: HTML, one stylesheet and inline SVG)."""
