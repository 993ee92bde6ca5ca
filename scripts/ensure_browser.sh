#!/usr/bin/env bash
# The page's browser test (tests/test_app.py) drives Debian's headless `chromium` through
# Playwright. Install it where apt can (about 50 s, once); elsewhere that test is skipped and says why.
command -v chromium >/dev/null || command -v chromium-browser >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
        || echo "note: apt could not install chromium; the browser test of the page will be skipped"
else
    echo "note: no chromium, and apt is not available to this user; the browser test of the page will be skipped"
fi
exit 0
