"""What the node agent does for one runnable pod: files, command line, process, readiness.

A kubelet runs a container image; we have no images, so a pod is runnable
when its container's command is a program on the agent's PATH (``derp-relay``,
``python3``…).  The pod then runs as a local process, as the kubelet would
start it, with these translations:

* volumes (Secret, ConfigMap, emptyDir) become directories under the pod's
  own directory; an argument that is a mount path, or starts with one (also
  after ``--flag=``), is rewritten to the local directory;
* a wildcard listen address as an argument (``:443``, ``0.0.0.0:443``,
  ``[::]:443``, also after ``--flag=``) becomes ``<node address>:443``: that
  is how the process is bound to its node's loopback address;
* env follows the kubelet: values, ``fieldRef``, ``secretKeyRef``,
  ``configMapKeyRef``, and ``$(VAR)`` expansion in env, command and args.

Liveness probes, resource limits, users and images are not emulated.
"""

from __future__ import annotations

import base64
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
Getter = Callable[[str, str, str], Obj | None]
"""(kind, namespace, name) -> the Secret or ConfigMap as JSON, or None."""

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_WILDCARD_LISTEN = re.compile(r"^(?P<flag>--?[\w-]+=)?(?:0\.0\.0\.0|\[::\])?:(?P<port>\d+)$")
RESTART_BACKOFF_MAX = 10.0


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, the rest stays."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(replace, text)


def runnable(pod: Mapping[str, Any], path: str) -> str | None:
    """The local program for the pod's first container, or None when it has to be pretend-run."""
    containers = (pod.get("spec") or {}).get("containers") or []
    command = (containers[0].get("command") or []) if containers else []
    return shutil.which(command[0], path=path) if command else None


def _decode(data: Mapping[str, str] | None, binary: bool) -> dict[str, bytes]:
    if not data:
        return {}
    return {k: base64.b64decode(v) if binary else v.encode() for k, v in data.items()}


def _write_atomically(path: Path, content: bytes, mode: int) -> None:
    """Replace a file in one step, as the kubelet's atomic writer does: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(content)
    temporary.chmod(mode)
    temporary.replace(path)


class RunningPod:
    """One runnable pod's local life: materialized volumes, its process, restarts and readiness."""

    def __init__(
        self, pod: Obj, node_ip: str, root: Path, program: str, *, get: Getter, agent_env: Mapping[str, str]
    ):
        self.pod = pod
        self.node_ip = node_ip
        self.root = root
        self.program = program
        self._get = get
        self._agent_env = dict(agent_env)
        meta = pod["metadata"]
        self.namespace, self.name = meta["namespace"], meta["name"]
        self.container = pod["spec"]["containers"][0]
        self.process: subprocess.Popen[bytes] | None = None
        self.restart_count = 0
        self.started_at = ""
        self.last_exit: tuple[int, str] | None = None
        self.ready = False
        self._restart_after = 0.0
        self._backoff = 1.0
        self._probe_successes = 0
        self._probe_failures = 0
        self._next_probe = 0.0
        self._stopping = False
        self._lock = threading.Lock()
        self._volume_content: dict[str, dict[str, bytes]] = {}
        self.log_path = root / "container.log"

    # --- volumes ------------------------------------------------------------------------

    def _volume_files(self, volume: Mapping[str, Any]) -> dict[str, bytes] | None:
        """The files a Secret/ConfigMap volume holds now; None when its source is missing."""
        if "secret" in volume:
            source = volume["secret"]
            obj = self._get("Secret", self.namespace, source["secretName"])
            files = _decode((obj or {}).get("data"), binary=True) if obj else None
        elif "configMap" in volume:
            source = volume["configMap"]
            obj = self._get("ConfigMap", self.namespace, source["name"])
            files = _decode((obj or {}).get("data"), binary=False) if obj else None
        else:
            return {}
        if files is not None and source.get("items"):
            files = {item["path"]: files[item["key"]] for item in source["items"] if item["key"] in files}
        return files

    def sync_volumes(self) -> str:
        """Write every volume's current content; returns a problem ("" when all sources exist)."""
        for volume in self.pod["spec"].get("volumes") or []:
            directory = self.root / "volumes" / volume["name"]
            directory.mkdir(parents=True, exist_ok=True)
            files = self._volume_files(volume)
            if files is None:
                kind = "secret" if "secret" in volume else "configmap"
                return f'{kind} for volume "{volume["name"]}" not found'
            if self._volume_content.get(volume["name"]) == files:
                continue
            source = volume.get("secret") or volume.get("configMap") or {}
            mode = int(source.get("defaultMode", 0o644))
            for relative, content in files.items():
                target = directory / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(target, content, mode)
            for stale in set(self._volume_content.get(volume["name"], {})) - set(files):
                (directory / stale).unlink(missing_ok=True)
            self._volume_content[volume["name"]] = files
        return ""

    # --- the command line ---------------------------------------------------------------

    def _field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        values = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.podIP": self.node_ip,
            "status.hostIP": self.node_ip,
        }
        return str(values.get(path, ""))

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for entry in self.container.get("env") or []:
            source = entry.get("valueFrom") or {}
            if "fieldRef" in source:
                value = self._field(source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = (
                    _decode((self._get("Secret", self.namespace, ref["name"]) or {}).get("data"), True)
                    .get(ref["key"], b"")
                    .decode()
                )
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                value = ((self._get("ConfigMap", self.namespace, ref["name"]) or {}).get("data") or {}).get(
                    ref["key"], ""
                )
            else:
                value = expand(str(entry.get("value", "")), env)
            env[entry["name"]] = value
        return env

    def _local_path(self, text: str) -> str:
        for mount in self.container.get("volumeMounts") or []:
            mount_path = mount["mountPath"].rstrip("/")
            local = str(self.root / "volumes" / mount["name"])
            if text == mount_path or text.startswith(mount_path + "/"):
                return local + text[len(mount_path) :]
        return text

    def translate(self, arg: str) -> str:
        if listen := _WILDCARD_LISTEN.match(arg):
            return f"{listen.group('flag') or ''}{self.node_ip}:{listen.group('port')}"
        flag, sep, value = arg.partition("=")
        if sep and flag.startswith("-"):
            return f"{flag}={self._local_path(value)}"
        return self._local_path(arg)

    def argv(self, env: Mapping[str, str]) -> list[str]:
        words = [*(self.container.get("command") or [])[1:], *(self.container.get("args") or [])]
        return [self.program, *(self.translate(expand(w, env)) for w in words)]

    # --- the process ----------------------------------------------------------------------

    def start(self) -> None:
        env = self.environment()
        argv = self.argv(env)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                argv,
                cwd=self.root,
                env={"PATH": self._agent_env.get("PATH", ""), "HOME": str(self.root), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Same process group as the agent: stopping the agent's group can never orphan a pod.
            )
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.ready = False
        self._probe_successes = self._probe_failures = 0
        probe = self.container.get("readinessProbe") or {}
        self._next_probe = time.monotonic() + float(probe.get("initialDelaySeconds", 0))

    def tick(self) -> bool:
        """Restart what exited, probe what runs; True when anything visible changed."""
        if self._stopping or self.process is None:
            return False
        code = self.process.poll()
        if code is None:
            return self._probe_if_due()
        if self._restart_after == 0.0:
            self.last_exit = (code, self._log_tail())
            self.ready = False
            self._restart_after = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF_MAX)
            return True
        if (
            time.monotonic() >= self._restart_after
            and self.pod["spec"].get("restartPolicy", "Always") != "Never"
        ):
            self._restart_after = 0.0
            self.restart_count += 1
            self.start()
            return True
        return False

    @property
    def crashed(self) -> bool:
        return self._restart_after != 0.0

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip().splitlines()[-1][:300]
        except (OSError, IndexError):
            return ""

    def _probe_if_due(self) -> bool:
        probe = self.container.get("readinessProbe")
        if not probe:
            changed = not self.ready
            self.ready = True
            return changed
        if time.monotonic() < self._next_probe:
            return False
        self._next_probe = time.monotonic() + float(probe.get("periodSeconds", 10))
        ok = self._probe_once(probe)
        was = self.ready
        if ok:
            self._probe_successes, self._probe_failures = self._probe_successes + 1, 0
            if self._probe_successes >= int(probe.get("successThreshold", 1)):
                self.ready = True
        else:
            self._probe_failures, self._probe_successes = self._probe_failures + 1, 0
            if self._probe_failures >= int(probe.get("failureThreshold", 3)):
                self.ready = False
        return was != self.ready

    def _port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for entry in self.container.get("ports") or []:
            if entry.get("name") == port:
                return int(entry["containerPort"])
        raise ValueError(f"no container port named {port!r}")

    def _probe_once(self, probe: Mapping[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if http := probe.get("httpGet"):
                scheme = str(http.get("scheme", "HTTP")).lower()
                url = f"{scheme}://{self.node_ip}:{self._port(http['port'])}{http.get('path', '/')}"
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # as the kubelet: probes do not verify certificates
                with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
                    return bool(200 <= response.status < 400)
            if tcp := probe.get("tcpSocket"):
                with socket.create_connection((self.node_ip, self._port(tcp["port"])), timeout=timeout):
                    return True
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return True

    def stop(self, grace: float) -> None:
        """SIGTERM, SIGKILL after ``grace`` seconds."""
        self.terminate()
        process = self.process
        if process is None:
            return
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def terminate(self) -> None:
        """Send SIGTERM now (safe from a signal handler); the process exits in its own time."""
        self._stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
