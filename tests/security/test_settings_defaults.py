"""Production settings are safe by default: the example project (config/settings.py) as an
attacker meets it when it is deployed with only the documented environment.

Each test runs ``manage.py`` in a subprocess with an environment built from scratch, so
nothing of the test run (tests/settings.py, the developer's shell) leaks into it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_DOC = ROOT / "docs" / "production.md"


def _base_env(var_dir: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "config.settings",
            "RECOVERY_VAR_DIR": str(var_dir), "PYTHONDONTWRITEBYTECODE": "1"}


def _manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _printed(done: subprocess.CompletedProcess) -> str:
    """The last line ``manage.py shell -c`` printed (Django 5.2 first says what it imported)."""
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _documented_environment(var_dir: Path) -> dict[str, str]:
    """The environment block of docs/production.md, evaluated by a shell as a deployer would."""
    block = re.search(r"```sh\n# production environment\n(.*?)```", PRODUCTION_DOC.read_text(),
                      re.S)
    assert block, "docs/production.md has no '# production environment' sh block"
    script = f"set -a\nPYTHON={sys.executable}\n{block.group(1)}\nset +a\nenv -0\n"
    done = subprocess.run(["bash", "-c", script], env=_base_env(var_dir), capture_output=True,
                          text=True, check=True)
    env = dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)
    env.pop("PYTHON", None)
    return env


def test_debug_is_off_when_the_environment_says_nothing(tmp_path):
    # Given a deployment with a secret key and nothing else
    env = _base_env(tmp_path) | {"DJANGO_SECRET_KEY": "k" * 60}
    # When the settings are read
    done = _manage(env, "shell", "-c", "from django.conf import settings; print(settings.DEBUG)")
    # Then DEBUG is off: no debug page shows settings and stack frames to a visitor
    assert _printed(done) == "False"


def test_start_up_without_a_secret_key_fails_and_says_how_to_fix_it(tmp_path):
    done = _manage(_base_env(tmp_path), "check")
    assert done.returncode != 0
    assert "DJANGO_SECRET_KEY" in done.stderr
    assert "secrets.token_urlsafe" in done.stderr  # how to make one


def test_start_up_with_the_published_demo_key_fails(tmp_path):
    # The demo's key is in the repository: anyone could sign sessions with it.
    env = _base_env(tmp_path) | {"DJANGO_SECRET_KEY": "insecure-demo-key-change-me"}
    done = _manage(env, "check")
    assert done.returncode != 0
    assert "DJANGO_SECRET_KEY" in done.stderr


def test_the_demo_alone_turns_debug_on_and_runs_without_a_key(tmp_path):
    done = _manage(_base_env(tmp_path), "demo", "--help")
    assert done.returncode == 0, done.stderr


def test_deploy_check_passes_on_the_documented_production_environment(tmp_path):
    env = _documented_environment(tmp_path)
    assert env.get("DJANGO_SECRET_KEY") and env.get("DJANGO_ALLOWED_HOSTS")
    done = _manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_documented_production_environment_turns_on_https_only_cookies_and_hsts(tmp_path):
    env = _documented_environment(tmp_path)
    code = ("from django.conf import settings as s; print(s.DEBUG, s.SESSION_COOKIE_SECURE, "
            "s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS >= 31536000, "
            "s.SESSION_COOKIE_AGE <= 12 * 3600, s.X_FRAME_OPTIONS, s.SECURE_PROXY_SSL_HEADER, "
            "s.ALLOWED_HOSTS)")
    done = _manage(env, "shell", "-c", code)
    assert _printed(done).split(" ", 8)[:8] == ["False", "True", "True", "True", "True", "True",
                                                "DENY", "None"]
    assert "ops.example.com" in _printed(done)


def test_trusting_the_proxys_https_header_is_opt_in(tmp_path):
    env = _documented_environment(tmp_path) | {"DJANGO_SECURE_PROXY_SSL_HEADER": "1"}
    done = _manage(env, "shell", "-c",
                   "from django.conf import settings; print(settings.SECURE_PROXY_SSL_HEADER)")
    assert _printed(done) == "('HTTP_X_FORWARDED_PROTO', 'https')"
