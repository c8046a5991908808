#!/usr/bin/env python3
"""Validates the deployment files offline; installs nothing, exits non-zero on any error.

- nomad-jobs/*.hcl parse with python-hcl2, and say what Nomad needs: plugin jobs with the
  same csi_plugin id, a service controller with >= 2 instances, a system node job,
  stage_publish_base_dir outside mount_dir, volume specs with valid capabilities and only
  the CreateVolume parameters src/params.rs knows.
- deploy/kubernetes/**/*.yaml validate against the Kubernetes JSON schemas shipped by
  kubernetes-validate (strict, two versions); the snapshot CRDs against small schemas
  embedded below; plus the CSI-specific settings (CSIDriver fields, sidecars, privileges).
- The docs these files rely on: the top README installs the binary the jobs default to, and
  where the docs name plugin id `virtdisk` they name the monolith's `<host>-virtdisk` too.
- With --binary, every `--flag` the jobs, manifests and systemd unit pass to virtdisk-csi
  must be a flag of that subcommand (read from its --help).

Needs: pip install python-hcl2 kubernetes-validate   (exit 77 when they are missing)
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys

try:
    import hcl2
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover
    print(f"SKIP: missing python package ({e.name}); pip install python-hcl2 kubernetes-validate")
    sys.exit(77)

K8S_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
ACCESS_MODES = {
    "single-node-reader-only",
    "single-node-writer",
    "multi-node-reader-only",
    "multi-node-single-writer",
    "multi-node-multi-writer",
}
ATTACHMENT_MODES = {"file-system", "block-device"}
SIDECARS = ["csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer", "livenessprobe"]

# The snapshot CRDs (snapshot.storage.k8s.io/v1) are not in the Kubernetes schemas: these
# follow the CRDs of kubernetes-csi/external-snapshotter for the fields we use.
META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
CRD_SCHEMAS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
            "kind": {"const": "VolumeSnapshotClass"},
            "metadata": META,
            "driver": {"type": "string", "minLength": 1},
            "deletionPolicy": {"enum": ["Delete", "Retain"]},
            "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
            "kind": {"const": "VolumeSnapshot"},
            "metadata": META,
            "spec": {
                "type": "object",
                "required": ["source"],
                "additionalProperties": False,
                "properties": {
                    "volumeSnapshotClassName": {"type": "string"},
                    "source": {
                        "type": "object",
                        "additionalProperties": False,
                        "oneOf": [
                            {"required": ["persistentVolumeClaimName"]},
                            {"required": ["volumeSnapshotContentName"]},
                        ],
                        "properties": {
                            "persistentVolumeClaimName": {"type": "string"},
                            "volumeSnapshotContentName": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}


class Checker:
    def __init__(self, root, binary):
        self.root = root
        self.binary = binary
        self.passed = 0
        self.failed = 0
        self.help_cache = {}

    def rel(self, path):
        return os.path.relpath(path, self.root)

    def ok(self, path, what):
        self.passed += 1
        print(f"OK    {self.rel(path)}: {what}")

    def fail(self, path, what):
        self.failed += 1
        print(f"FAIL  {self.rel(path)}: {what}")

    def expect(self, cond, path, what):
        (self.ok if cond else self.fail)(path, what)
        return cond

    # -- parameters and flags -------------------------------------------------------------

    def param_keys(self):
        """The CreateVolume parameter keys, read from src/params.rs KEYS."""
        text = open(os.path.join(self.root, "src/params.rs")).read()
        match = re.search(r"\bconst KEYS\b", text)
        if not match:
            raise RuntimeError("no KEYS found in src/params.rs")
        block = text[match.start() :]
        block = block[: block.index("];")]
        keys = set(re.findall(r'\(\s*"([A-Za-z]+)"\s*,', block))
        if not keys:
            raise RuntimeError("no KEYS found in src/params.rs")
        return keys

    def check_params(self, path, params, what):
        known = self.param_keys()
        unknown = sorted(
            k for k in params if k not in known and not k.startswith("csi.storage.k8s.io/")
        )
        self.expect(
            not unknown,
            path,
            f"{what}: parameters {sorted(params)} are known to src/params.rs"
            + (f" (unknown: {unknown})" if unknown else ""),
        )

    def flags_of(self, subcommand):
        if subcommand not in self.help_cache:
            out = subprocess.run(
                [self.binary, subcommand, "--help"], capture_output=True, text=True, check=True
            ).stdout
            self.help_cache[subcommand] = set(re.findall(r"(--[a-z][a-z0-9-]*)", out))
        return self.help_cache[subcommand]

    def check_args(self, path, args, what):
        """args = [subcommand, --flag, value, --flag=value, ...] of virtdisk-csi."""
        if not self.binary or not args:
            return
        sub = args[0]
        flags = [a.split("=", 1)[0] for a in args[1:] if a.startswith("--")]
        unknown = [f for f in flags if f not in self.flags_of(sub)]
        self.expect(
            not unknown,
            path,
            f"{what}: `virtdisk-csi {sub}` accepts {flags}"
            + (f" (unknown: {unknown})" if unknown else ""),
        )

    # -- Nomad ----------------------------------------------------------------------------

    def load_hcl(self, path):
        with open(path) as f:
            try:
                from hcl2.utils import SerializationOptions

                opts = SerializationOptions(
                    with_comments=False, explicit_blocks=False, strip_string_quotes=True
                )
                return hcl2.load(f, serialization_options=opts)
            except ImportError:  # python-hcl2 < 8 strips quotes by itself
                return hcl2.load(f)

    @staticmethod
    def unquote(v):
        if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
            return v[1:-1]
        return v

    @staticmethod
    def blocks(node, name):
        """Labelled blocks `name "label" {...}` as (label, body) pairs."""
        out = []
        for item in node.get(name, []):
            for label, body in item.items():
                out.append((Checker.unquote(label), body))
        return out

    @staticmethod
    def one(node, name):
        """Unlabelled blocks `name {...}` as a list of bodies."""
        v = node.get(name, [])
        return v if isinstance(v, list) else [v]

    # Nomad's HCL2 expressions the job files use: `var.x`, `local.x`, quoted strings and
    # `a == "" ? b : c` / `a != "" ? b : c`. Runtime interpolations (`${CSI_ENDPOINT}`,
    # `${NOMAD_ADDR_metrics}`, `${node.unique.name}` …) stay as they are.
    INNER = re.compile(r"\$\{([^${}]*)\}")
    COND = re.compile(r'\s*(\S+)\s*(==|!=)\s*""\s*\?\s*("[^"]*"|\S+)\s*:\s*("[^"]*"|\S+)\s*')

    def operand(self, token, scope):
        if len(token) >= 2 and token[0] == token[-1] == '"':
            return token[1:-1]
        if token in scope:
            return scope[token]
        return None

    def evaluate(self, expr, scope):
        """One `${...}` body; None when it is not ours to evaluate (runtime interpolation)."""
        expr = expr.strip()
        if expr in scope:
            return scope[expr]
        m = self.COND.fullmatch(expr)
        if m:
            a = self.operand(m.group(1), scope)
            b = self.operand(m.group(3), scope)
            c = self.operand(m.group(4), scope)
            if a is None or b is None or c is None:
                return None
            empty = a == ""
            return b if empty == (m.group(2) == "==") else c
        return None

    def resolve(self, value, scope):
        """Variables, locals and conditionals replaced by their values, innermost first; a
        string that is one whole reference to a list gives the list."""
        if not isinstance(value, str):
            return value
        whole = re.fullmatch(r"\$\{\s*((?:var|local)\.[a-z_]+)\s*\}", value)
        if whole and whole.group(1) in scope and not isinstance(scope[whole.group(1)], str):
            return scope[whole.group(1)]
        while True:
            kept = []

            def sub(m):
                v = self.evaluate(m.group(1), scope)
                if v is None or not isinstance(v, (str, int)):
                    kept.append(m.group(0))
                    return "\x00%d\x00" % (len(kept) - 1)
                return str(v)

            new = self.INNER.sub(sub, value)
            new = re.sub("\x00(\\d+)\x00", lambda m: kept[int(m.group(1))], new)
            if new == value:
                return value
            value = new

    def scope_of(self, doc):
        """`var.<name>` → its default (`<name>` when it has none: the user must set it) and
        `local.<name>` → its value, for one file."""
        scope = {}
        for name, body in self.blocks(doc, "variable"):
            default = body.get("default", f"<{name}>")
            scope[f"var.{name}"] = self.unquote(default)
        pending = {}
        for block in self.one(doc, "locals"):
            pending.update(block)
        for _ in range(len(pending) + 1):
            for name, expr in list(pending.items()):
                v = self.resolve(self.unquote(expr), scope)
                if not (isinstance(v, str) and "${" in v):
                    scope[f"local.{name}"] = v
                    del pending[name]
        for name in pending:
            self.fail(self.current, f"local {name} could not be evaluated")
        return scope

    def check_nomad(self):
        files = sorted(
            glob.glob(os.path.join(self.root, "nomad-jobs", "**", "*.hcl"), recursive=True)
        )
        if not files:
            self.fail(os.path.join(self.root, "nomad-jobs"), "no .hcl files")
            return
        plugins = {}  # (directory, id, type) -> path
        shapes = {}  # job file -> what must be the same in its variant for other versions
        volume_specs = []
        consumers = []
        for path in files:
            self.current = path
            try:
                doc = self.load_hcl(path)
            except Exception as e:  # the parser's own error text
                self.fail(path, f"does not parse: {e}")
                continue
            self.ok(path, "parses as HCL2")
            if self.unquote(doc.get("type")) == "csi":
                volume_specs.append(self.check_volume_spec(path, doc))
                continue
            self.check_versions(path, doc)
            scope = self.scope_of(doc)
            for job_name, job in self.blocks(doc, "job"):
                self.check_job(path, job_name, job, scope, plugins, consumers)
            shapes[path] = self.shape(doc, scope)
        self.check_variants(shapes)
        # In each directory, controller and node must share the plugin id (the monolith is
        # separate).
        for d in sorted({os.path.dirname(p) for p in files}):
            ctl = {pid for (dd, pid, t) in plugins if dd == d and t == "controller"}
            node = {pid for (dd, pid, t) in plugins if dd == d and t == "node"}
            if ctl or node:
                self.expect(
                    ctl and ctl == node,
                    d,
                    f"controller and node jobs use the same csi_plugin id ({sorted(ctl)} / {sorted(node)})",
                )
        ids = {pid for (_, pid, _) in plugins}
        # Nomad 1.1.0-1.1.12 and 1.2.0-1.2.6 look plugins up by id prefix: no id may start
        # with another (an unset variable, `<host>`, as the examples' hv1).
        example = {pid: re.sub(r"<[a-z_]+>", "hv1", pid) for pid in ids}
        for a in sorted(ids):
            for b in sorted(ids):
                if a != b:
                    self.expect(
                        not example[b].startswith(example[a]),
                        os.path.join(self.root, "nomad-jobs"),
                        f"plugin id {b!r} does not start with plugin id {a!r} (Nomad < 1.1.13 finds plugins by prefix)",
                    )
        for path, vid, plugin_id in volume_specs:
            # A job's id with an unset variable in it (`<host>-virtdisk`) matches any value.
            patterns = {
                pid: "[A-Za-z0-9_.-]+".join(map(re.escape, re.split(r"<[a-z_]+>", pid)))
                for pid in ids
            }
            matches = [pid for pid, pat in patterns.items() if re.fullmatch(pat, plugin_id)]
            self.expect(
                bool(matches),
                path,
                f"plugin_id {plugin_id!r} is the csi_plugin id of a plugin job ({sorted(ids)})",
            )
        for path, source in consumers:
            self.expect(
                source in {vid for (_, vid, _) in volume_specs},
                path,
                f"volume source {source!r} is a volume spec in nomad-jobs/",
            )

    # What each Nomad version lacks (README.md of nomad-jobs says the same).
    NEWER = {
        "stage_publish_base_dir": "1.3.3",
        "health_timeout": "1.1.15/1.2.9/1.3.2",
        "${CSI_ENDPOINT}": "1.1.13/1.2.7/1.3.0",
    }

    def check_versions(self, path, doc):
        """Files under nomad-1.1/ use nothing Nomad 1.1.0 lacks; every job file says which
        Nomad versions it needs."""
        text = open(path).read()
        self.expect(
            re.search(r"Nomad (>= ?1\.\d|1\.1\.0)", text) is not None,
            path,
            "says which Nomad versions it needs",
        )
        if os.path.basename(os.path.dirname(path)) != "nomad-1.1":
            return
        code = "\n".join(l.split("#", 1)[0] for l in text.splitlines())
        for what, since in self.NEWER.items():
            self.expect(what not in code, path, f"uses no {what} (Nomad {since})")
        scope = self.scope_of(doc)
        dcs = scope.get("var.datacenters")
        self.expect(
            isinstance(dcs, list) and "*" not in dcs,
            path,
            f"default datacenters {dcs} has no wildcard (Nomad >= 1.5)",
        )

    # The arguments that differ between a job and its nomad-1.1/ variant, and why: the socket
    # Nomad < 1.3 dials is in the plugin's directory (no CSI_ENDPOINT before 1.1.13/1.2.7).
    VARIANT_ARGS = {"--endpoint"}
    # The controller of Nomad < 1.3 needs the plugin's host directory for that socket.
    VARIANT_VARIABLES = {"nomad_data_dir", "nomad_state_dir"}

    def shape(self, doc, scope):
        """What a job file and its variant for other Nomad versions must share: variables,
        jobs, their groups, tasks, drivers, csi_plugin ids and types, and the plugin's
        arguments (but for VARIANT_ARGS)."""
        out = {
            "variables": sorted(
                n for n, _ in self.blocks(doc, "variable") if n not in self.VARIANT_VARIABLES
            )
        }
        for job_name, job in self.blocks(doc, "job"):
            for group_name, group in self.blocks(job, "group"):
                for task_name, task in self.blocks(group, "task"):
                    config = (self.one(task, "config") or [{}])[0]
                    args = [str(self.resolve(self.unquote(a), scope)) for a in config.get("args", [])]
                    kept = []
                    skip = False
                    for a in args:
                        if skip:
                            skip = False
                            continue
                        if a in self.VARIANT_ARGS:
                            skip = True
                            continue
                        kept.append(a)
                    plugin = [
                        (str(self.resolve(self.unquote(p.get("id", "")), scope)), self.unquote(p.get("type", "")))
                        for p in self.one(task, "csi_plugin")
                    ]
                    out[f"{job_name}/{group_name}/{task_name}"] = {
                        "driver": self.unquote(task.get("driver")),
                        "args": kept,
                        "csi_plugin": plugin,
                        "templates": len(self.one(task, "template")),
                    }
        return out

    def check_variants(self, shapes):
        """nomad-1.1/X and X describe the same deployment: only the documented differences."""
        for path, shape in shapes.items():
            if os.path.basename(os.path.dirname(path)) != "nomad-1.1":
                continue
            main = os.path.join(os.path.dirname(os.path.dirname(path)), os.path.basename(path))
            if not self.expect(main in shapes, path, f"is a variant of {self.rel(main)}"):
                continue
            diff = sorted(
                k for k in set(shape) | set(shapes[main]) if shape.get(k) != shapes[main].get(k)
            )
            self.expect(
                not diff,
                path,
                f"differs from {self.rel(main)} only where Nomad 1.1 needs it"
                + (f" (also: {diff}: {[shape.get(k) for k in diff]} / {[shapes[main].get(k) for k in diff]})" if diff else ""),
            )

    def check_job(self, path, job_name, job, scope, plugins, consumers):
        jtype = self.unquote(job.get("type", "service"))
        for group_name, group in self.blocks(job, "group"):
            count = self.resolve(group.get("count", 1), scope)
            for vol_name, vol in self.blocks(group, "volume"):
                self.check_consumer_volume(path, vol_name, vol)
                consumers.append((path, self.unquote(vol.get("source"))))
            for task_name, task in self.blocks(group, "task"):
                where = f"job {job_name} task {task_name}"
                driver = self.unquote(task.get("driver"))
                config = (self.one(task, "config") or [{}])[0]
                args = [str(self.resolve(self.unquote(a), scope)) for a in config.get("args", [])]
                if args and args[0] in ("serve", "doctor", "client"):
                    self.check_args(path, args, where)
                templates = {
                    self.resolve(self.unquote(t.get("destination")), scope)
                    for t in self.one(task, "template")
                }
                if "--config" in args:
                    conf = args[args.index("--config") + 1]
                    self.expect(
                        conf in templates,
                        path,
                        f"{where}: --config {conf} is rendered by a template, so it exists on a fresh host",
                    )
                for plugin in self.one(task, "csi_plugin"):
                    self.check_plugin(path, where, jtype, count, driver, config, args, plugin, scope, plugins)

    def check_plugin(self, path, where, jtype, count, driver, config, args, plugin, scope, plugins):
        pid = str(self.resolve(self.unquote(plugin.get("id", "")), scope))
        ptype = self.unquote(plugin.get("type", ""))
        plugins[(os.path.dirname(path), pid, ptype)] = path
        self.expect(bool(pid), path, f"{where}: csi_plugin has an id")
        self.expect(
            ptype in ("controller", "node", "monolith"),
            path,
            f"{where}: csi_plugin type {ptype!r} is controller, node or monolith",
        )
        mount_dir = str(self.resolve(self.unquote(plugin.get("mount_dir", "/csi")), scope)).rstrip("/")
        has_base = "stage_publish_base_dir" in plugin
        base = str(self.resolve(self.unquote(plugin.get("stage_publish_base_dir", "/local/csi")), scope))
        self.expect(
            not (base + "/").startswith(mount_dir + "/"),
            path,
            f"{where}: stage_publish_base_dir {base} is not inside mount_dir {mount_dir}",
        )
        self.expect(
            "--mode" in args and args[args.index("--mode") + 1] == ptype,
            path,
            f"{where}: runs `serve --mode {ptype}`",
        )
        if ptype == "controller":
            self.expect(jtype == "service", path, f"{where}: controller job is a service")
            self.expect(
                isinstance(count, int) and count >= 2,
                path,
                f"{where}: >= 2 controller instances (count = {count})",
            )
        else:
            self.expect(jtype == "system", path, f"{where}: {ptype} job is a system job")
            privileged = driver == "raw_exec" or config.get("privileged") is True
            self.expect(
                privileged,
                path,
                f"{where}: {ptype} plugin runs privileged (raw_exec or privileged=true)",
            )
        if driver != "raw_exec":
            return
        # Where Nomad keeps this plugin on the host: <client state_dir>/csi/<type>/<id>, the
        # state_dir being <data_dir>/client (client/allocrunner/taskrunner/
        # plugin_supervisor_hook.go, command/agent/agent.go).
        data_dir = scope.get("var.nomad_data_dir", "/opt/nomad/data")
        host_dir = f"{data_dir}/client/csi/{ptype}/{pid}"
        endpoint = args[args.index("--endpoint") + 1] if "--endpoint" in args else ""
        if has_base:
            # Nomad >= 1.3.3: paths under stage_publish_base_dir, socket at $CSI_ENDPOINT.
            if ptype != "controller":
                self.expect(
                    base == host_dir,
                    path,
                    f"{where}: raw_exec plugin gets host paths (stage_publish_base_dir = {base}, Nomad's directory {host_dir})",
                )
            self.expect(
                endpoint == "${CSI_ENDPOINT}",
                path,
                f"{where}: listens on ${{CSI_ENDPOINT}} (the host socket path under raw_exec)",
            )
        else:
            # Nomad < 1.3 (or a controller): the socket in mount_dir, paths under mount_dir.
            if ptype != "controller" or endpoint != "${CSI_ENDPOINT}":
                self.expect(
                    mount_dir == host_dir,
                    path,
                    f"{where}: raw_exec mount_dir {mount_dir} is Nomad's directory {host_dir} (Nomad < 1.3 sends paths under it)",
                )
                self.expect(
                    endpoint == f"unix://{mount_dir}/csi.sock",
                    path,
                    f"{where}: listens on unix://<mount_dir>/csi.sock ({endpoint})",
                )
        if ptype != "controller":
            roots = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--allowed-path-root"]
            self.expect(
                roots == [host_dir],
                path,
                f"{where}: --allowed-path-root {roots} is Nomad's directory for the plugin",
            )

    def check_consumer_volume(self, path, name, vol):
        access = self.unquote(vol.get("access_mode"))
        attach = self.unquote(vol.get("attachment_mode"))
        self.expect(
            access in ACCESS_MODES and attach in ATTACHMENT_MODES,
            path,
            f"volume {name}: access_mode {access} / attachment_mode {attach} are valid",
        )
        if access and access.endswith("reader-only"):
            self.expect(vol.get("read_only") is True, path, f"volume {name}: reader-only needs read_only = true")
        if attach == "block-device":
            self.expect("mount_options" not in vol, path, f"volume {name}: block volumes take no mount_options")

    def check_volume_spec(self, path, doc):
        vid = self.unquote(doc.get("id", ""))
        plugin_id = self.unquote(doc.get("plugin_id", ""))
        for field in ("id", "name", "plugin_id"):
            self.expect(bool(self.unquote(doc.get(field, ""))), path, f"volume spec has {field}")
        caps = self.one(doc, "capability")
        self.expect(len(caps) >= 1, path, "volume spec has at least one capability")
        for cap in caps:
            access = self.unquote(cap.get("access_mode"))
            attach = self.unquote(cap.get("attachment_mode"))
            self.expect(
                access in ACCESS_MODES and attach in ATTACHMENT_MODES,
                path,
                f"capability {access} / {attach} is valid",
            )
        for field in ("capacity_min", "capacity_max"):
            if field in doc:
                v = self.unquote(doc[field])
                self.expect(
                    re.fullmatch(r"\d+(\.\d+)?\s*([KMGTP]i?B?)?", v, re.I) is not None,
                    path,
                    f"{field} {v!r} is a size",
                )
        self.expect(
            not ("snapshot_id" in doc and "clone_id" in doc),
            path,
            "snapshot_id and clone_id are not both set",
        )
        if "snapshot_id" in doc:
            sid = self.unquote(doc["snapshot_id"])
            self.expect(
                re.fullmatch(r"[A-Za-z0-9_-]{1,32}\.s[0-9a-f]{16}", sid) is not None,
                path,
                f"snapshot_id {sid!r} has the plugin's snapshot id shape <pool>.s<16 hex>",
            )
        params = {}
        for p in self.one(doc, "parameters"):
            params.update({self.unquote(k): self.unquote(v) for k, v in p.items()})
        self.check_params(path, params, "volume spec")
        for topo in self.one(doc, "topology_request"):
            for kind in ("required", "preferred"):
                for req in self.one(topo, kind):
                    for t in self.one(req, "topology"):
                        segs = (self.one(t, "segments") or [{}])[0]
                        segs = {self.unquote(k): self.unquote(v) for k, v in segs.items()}
                        self.expect(
                            bool(segs) and all(k and isinstance(v, str) for k, v in segs.items()),
                            path,
                            f"topology_request {kind} segments {segs}",
                        )
        return (path, vid, plugin_id)

    # -- Kubernetes -----------------------------------------------------------------------

    def check_kubernetes(self):
        files = sorted(glob.glob(os.path.join(self.root, "deploy", "kubernetes", "**", "*.yaml"), recursive=True))
        if not files:
            self.fail(os.path.join(self.root, "deploy/kubernetes"), "no .yaml files")
            return
        docs = []
        for path in files:
            try:
                with open(path) as f:
                    loaded = [d for d in yaml.safe_load_all(f) if d is not None]
            except yaml.YAMLError as e:
                self.fail(path, f"is not YAML: {e}")
                continue
            for doc in loaded:
                docs.append((path, doc))
                self.validate_k8s(path, doc)
        self.check_csi_objects(docs)

    def validate_k8s(self, path, doc):
        kind = doc.get("kind")
        api = doc.get("apiVersion")
        name = (doc.get("metadata") or {}).get("name")
        what = f"{kind} {name}"
        schema = CRD_SCHEMAS.get((api, kind))
        if schema is not None:
            try:
                jsonschema.validate(doc, schema)
                self.ok(path, f"{what} validates against the embedded {api} schema")
            except jsonschema.ValidationError as e:
                at = ".".join(str(p) for p in e.path)
                self.fail(path, f"{what}: {at}: {e.message}")
            return
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                self.ok(path, f"{what} validates against Kubernetes {version} (strict)")
            except kubernetes_validate.ValidationError as e:
                at = ".".join(str(p) for p in e.path)
                self.fail(path, f"{what} against Kubernetes {version}: {at}: {e.message}")
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
                self.fail(path, f"{what}: {e.message}")

    def check_csi_objects(self, docs):
        by_kind = {}
        for path, doc in docs:
            by_kind.setdefault(doc.get("kind"), []).append((path, doc))
        drivers = by_kind.get("CSIDriver", [])
        if not self.expect(len(drivers) == 1, self.root, "exactly one CSIDriver"):
            return
        dpath, driver = drivers[0]
        dname = driver["metadata"]["name"]
        spec = driver.get("spec", {})
        self.expect(spec.get("attachRequired") is True, dpath, "CSIDriver attachRequired: true")
        self.expect(spec.get("podInfoOnMount") is False, dpath, "CSIDriver podInfoOnMount: false")
        self.expect(spec.get("fsGroupPolicy") == "File", dpath, "CSIDriver fsGroupPolicy: File")
        for path, sc in by_kind.get("StorageClass", []):
            self.expect(sc.get("provisioner") == dname, path, f"StorageClass provisioner is {dname}")
            self.check_params(path, sc.get("parameters", {}), "StorageClass")
        for path, vsc in by_kind.get("VolumeSnapshotClass", []):
            self.expect(vsc.get("driver") == dname, path, f"VolumeSnapshotClass driver is {dname}")
        self.expect(by_kind.get("VolumeSnapshotClass"), self.root, "a VolumeSnapshotClass exists")
        deployments = by_kind.get("Deployment", [])
        daemonsets = by_kind.get("DaemonSet", [])
        self.expect(len(deployments) == 1 and len(daemonsets) == 1, self.root, "one controller Deployment and one node DaemonSet")
        for path, dep in deployments:
            pod = dep["spec"]["template"]["spec"]
            images = [c["image"] for c in pod["containers"]]
            for sidecar in SIDECARS:
                self.expect(
                    any(f"/{sidecar}:" in i for i in images),
                    path,
                    f"controller has the {sidecar} sidecar",
                )
            self.expect(dep["spec"].get("replicas", 1) >= 2, path, "controller has >= 2 replicas")
            self.check_plugin_containers(path, pod, "controller")
        for path, ds in daemonsets:
            pod = ds["spec"]["template"]["spec"]
            images = [c["image"] for c in pod["containers"]]
            self.expect(any("/csi-node-driver-registrar:" in i for i in images), path, "node has node-driver-registrar")
            self.expect(any("/livenessprobe:" in i for i in images), path, "node has the livenessprobe sidecar")
            plugin = self.check_plugin_containers(path, pod, "node")
            if plugin:
                self.expect(
                    (plugin.get("securityContext") or {}).get("privileged") is True,
                    path,
                    "node plugin container is privileged",
                )
                props = {m["mountPath"]: m.get("mountPropagation") for m in plugin.get("volumeMounts", [])}
                self.expect(
                    props.get("/var/lib/kubelet") == "Bidirectional",
                    path,
                    "node plugin mounts /var/lib/kubelet with Bidirectional propagation",
                )
        rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
        self.expect(rbac_kinds <= set(by_kind), self.root, "RBAC objects exist")

    def check_plugin_containers(self, path, pod, mode):
        plugin = None
        for c in pod["containers"]:
            args = [str(a) for a in c.get("args", [])]
            if args and args[0] == "serve":
                plugin = c
                self.expect(f"--mode={mode}" in args, path, f"plugin container runs serve --mode={mode}")
                self.check_args(path, args, f"container {c['name']}")
        self.expect(plugin is not None, path, f"a virtdisk-csi {mode} container exists")
        return plugin

    # -- systemd --------------------------------------------------------------------------

    def check_systemd(self):
        for path in sorted(glob.glob(os.path.join(self.root, "deploy", "systemd", "*.service"))):
            text = open(path).read().replace("\\\n", " ")
            sections = re.findall(r"^\[(\w+)\]\s*$", text, re.M)
            self.expect(sections == ["Unit", "Service", "Install"], path, f"sections {sections}")
            for key in ("ExecStart", "ExecStartPre"):
                for line in re.findall(rf"^{key}=(.*)$", text, re.M):
                    words = line.lstrip("-").split()
                    self.expect(
                        words and words[0].endswith("/virtdisk-csi"),
                        path,
                        f"{key} runs virtdisk-csi",
                    )
                    self.check_args(path, words[1:], key)

    # -- documentation that the files rely on ---------------------------------------------

    def check_docs(self):
        """What a new user follows: the binary path the jobs default to is installed by a
        command of the top README; wherever the docs name plugin id `virtdisk`, the monolith's
        id (`<host>-virtdisk`, which Nomad needs exactly: with a wrong id Nomad 1.1 silently
        lists the first plugin's snapshots) is said too."""
        readme = os.path.join(self.root, "README.md")
        jobs = sorted(glob.glob(os.path.join(self.root, "nomad-jobs", "**", "plugin-*.hcl"), recursive=True))
        binaries = set()
        for path in jobs:
            binaries |= set(re.findall(r'default\s*=\s*"(/[^"]*/virtdisk-csi)"', open(path).read()))
        text = open(readme).read()
        for binary in sorted(binaries):
            directory = os.path.dirname(binary)
            installed = re.search(
                rf"(cargo install --path \. --root {re.escape(os.path.dirname(directory))}\b"
                rf"|install [^\n]*target/release/virtdisk-csi {re.escape(directory)}/?)",
                text,
            )
            self.expect(installed, readme, f"a command installs the jobs' binary {binary}")
        guide = os.path.join(self.root, "nomad-jobs", "README.md")
        sections = re.split(r"^#+ ", open(guide).read(), flags=re.M)
        for section in sections:
            if re.search(r"(-plugin|snapshot delete) virtdisk\b", section):
                self.expect(
                    "<host>-virtdisk" in section,
                    guide,
                    f"section '{section.splitlines()[0]}' names the monolith's plugin id too",
                )
        for path in sorted(glob.glob(os.path.join(self.root, "nomad-jobs", "volume*.hcl"))):
            spec = open(path).read()
            if re.search(r'^plugin_id\s*=\s*"virtdisk"', spec, re.M) and "two-host" not in spec:
                self.expect(
                    "<host>-virtdisk" in spec or "volume-local.hcl" in spec,
                    path,
                    "says what the monolith uses instead of plugin id virtdisk",
                )


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.dirname(here), help="repository root")
    ap.add_argument("--binary", help="virtdisk-csi binary to check flags against")
    a = ap.parse_args()
    c = Checker(a.root, a.binary)
    c.check_nomad()
    c.check_kubernetes()
    c.check_systemd()
    c.check_docs()
    print(f"manifests: {c.passed} passed, {c.failed} failed")
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
