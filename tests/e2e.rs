//! End-to-end test with real Kubernetes components on loopback: etcd, kube-apiserver,
//! kube-controller-manager (PV binder, expander, PV/PVC protection), csi-provisioner (one per
//! node, `--node-deployment`, as in the distributed overlay), csi-resizer, csi-snapshotter (one
//! per node, `--node-deployment`) and snapshot-controller, all pointed at k8scsi servers
//! started here. There is no kubelet or container runtime: the test creates the Node and CSINode
//! objects itself and calls the node service directly, as the kubelet would.
//!
//! The Go tools come from `e2e/build-tools.sh` (run by scripts/install-test-tools.sh) into
//! `$K8SCSI_TOOLS_DIR/e2e/bin` (default `~/.cache/k8scsi-tools/e2e/bin`). Without them, or
//! without root, the test skips with the reason; with `K8SCSI_REQUIRE_TOOLS=1` (CI) it fails.
//!
//! The sidecars authenticate as the deployment's ServiceAccount (`k8scsi:k8scsi-node`) through
//! a static token, and the RBAC objects come from `deploy/kustomize/base`, so a missing
//! permission fails here exactly as it would in a cluster. Their flags are taken from the
//! rendered overlays, so a flag the sidecar does not know fails here too.
//!
//! Run alone: `sudo -E cargo test --test e2e -- --nocapture`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8scsi::client::{connect, mount_capability};
use k8scsi::csi::proto::controller_client::ControllerClient;
use k8scsi::csi::proto::controller_service_capability::Type as CapType;
use k8scsi::csi::proto::controller_service_capability::rpc::Type as RpcType;
use k8scsi::csi::proto::node_client::NodeClient;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::{self};
use k8scsi::server::Endpoint;
use serde_json::{Value, json};

const DRIVER: &str = "k8scsi";
const NAMESPACE: &str = "k8scsi";
const SERVICE_ACCOUNT: &str = "k8scsi-node";
const TOPOLOGY_KEY: &str = "topology.k8scsi.io/node";
const NODES: [&str; 2] = ["node-1", "node-2"];
/// How many PVCs the bulk scenario creates at once (K8SCSI_E2E_PVCS overrides).
const BULK_PVCS: usize = 200;

/// Generous: the box is shared with other test runs and builds.
const STARTUP: Duration = Duration::from_secs(180);
const STEP: Duration = Duration::from_secs(180);
const BULK: Duration = Duration::from_secs(900);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tools_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("K8SCSI_TOOLS_DIR") {
        return PathBuf::from(dir).join("e2e");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_string());
    PathBuf::from(home).join(".cache/k8scsi-tools/e2e")
}

const TOOLS: [&str; 8] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "csi-provisioner",
    "csi-resizer",
    "csi-snapshotter",
    "snapshot-controller",
];

/// Why the e2e test cannot run here, if it cannot.
fn missing_tools() -> Option<String> {
    let bin = tools_dir().join("bin");
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .chain(["helm"])
        .filter(|t| !bin.join(t).is_file())
        .collect();
    if !tools_dir().join("snapshot-crds/.version").is_file() {
        missing.push("snapshot CRDs");
    }
    if Command::new("openssl").arg("version").output().is_err() {
        missing.push("openssl");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "e2e tools missing in {}: {} (run e2e/build-tools.sh)",
            bin.display(),
            missing.join(", ")
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 250 ms until it returns `Some`, panicking with `what` after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A started process, killed (and reaped) when dropped, also when the test panics.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Peak resident set size (VmHWM) in KiB, from /proc.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The control plane, the drivers and the sidecars, all under one temporary directory.
struct Cluster {
    /// Dropped in reverse start order (sidecars before drivers before the API server).
    procs: Vec<Proc>,
    bin: PathBuf,
    admin: PathBuf,
    sidecar_kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.procs {
                eprintln!(
                    "----- last log lines of {} ({}) -----\n{}",
                    p.name,
                    p.log.display(),
                    p.log_tail(40)
                );
            }
        }
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
        // Unmount whatever a failed scenario left under our own directory, deepest first.
        if let Ok(table) = k8scsi::mount::mountinfo::read() {
            let mut points: Vec<PathBuf> = table
                .into_iter()
                .map(|e| e.mount_point)
                .filter(|p| p.starts_with(self.dir.path()))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for p in points {
                let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn kubeconfig(server: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    \
         insecure-skip-tls-verify: true\nusers:\n- name: e2e\n  user:\n    token: {token}\n\
         contexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: e2e\ncurrent-context: e2e\n"
    )
}

/// Takes the `args` of `container` from a rendered DaemonSet/Deployment, replacing the CSI socket
/// path (a container path) with `socket`.
fn container_args(objects: &[Value], kind: &str, container: &str, socket: &Path) -> Vec<String> {
    let workload = objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["name"] == container))
        })
        .unwrap_or_else(|| panic!("no {kind} with a {container} container in the overlay"));
    let c = workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == container)
        .unwrap();
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            if a.starts_with("--csi-address=") {
                format!("--csi-address={}", socket.display())
            } else {
                a.to_string()
            }
        })
        .collect()
}

/// Every container of every DaemonSet/Deployment, keyed by workload and container name, with
/// what decides its behaviour: image, args and (for the sidecars) env. The chart must render the
/// same as the overlay; only the driver container may differ in env (the chart passes
/// `K8SCSI_DRIVER_NAME` for its `driverName` value).
fn workload_containers(objects: &[Value]) -> std::collections::BTreeMap<String, Value> {
    let mut out = std::collections::BTreeMap::new();
    for o in objects
        .iter()
        .filter(|o| o["kind"] == "DaemonSet" || o["kind"] == "Deployment")
    {
        for c in o["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
        {
            let key = format!(
                "{}/{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap(),
                c["name"].as_str().unwrap()
            );
            let env = if c["name"] == "k8scsi" {
                Value::Null
            } else {
                c["env"].clone()
            };
            out.insert(
                key,
                json!({"image": c["image"], "args": c["args"], "env": env}),
            );
        }
    }
    out
}

impl Cluster {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[String], env: &[(&str, &str)]) {
        let log = self.path(&format!("logs/{name}.log"));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log,
        });
    }

    /// Panics with its log if a started process has exited.
    fn check_alive(&mut self) {
        for p in &mut self.procs {
            if !p.alive() {
                panic!("{} exited:\n{}", p.name, p.log_tail(60));
            }
        }
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.tool("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.admin).args(args);
        cmd
    }

    /// One kubectl run, with `input` on stdin when given.
    fn kubectl_once(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut child = self
            .kubectl_cmd(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = input {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// kubectl that must succeed. Every command the test issues is idempotent (apply,
    /// `delete --ignore-not-found`, `annotate --overwrite`, merge patches), so a failure is
    /// retried a few times: under heavy load the API server may time out a request.
    fn kubectl_retry(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut attempt = 1;
        loop {
            let out = self.kubectl_once(args, input);
            if out.status.success() {
                return out;
            }
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                attempt < 4,
                "kubectl {args:?} failed {attempt} times:\n{}\n{stderr}\ninput:\n{}",
                String::from_utf8_lossy(&out.stdout),
                input.unwrap_or("")
            );
            eprintln!("    kubectl {args:?} failed (attempt {attempt}), retrying: {stderr}");
            attempt += 1;
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_retry(args, None)
    }

    /// kubectl with `input` on stdin.
    fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        self.kubectl_retry(args, Some(input))
    }

    fn apply_json(&self, object: &Value) {
        self.kubectl_stdin(&["apply", "-f", "-"], &object.to_string());
    }

    /// `kubectl get -o json`, or `None` when the object does not exist. Other errors are
    /// retried like [`Cluster::kubectl_retry`].
    fn get(&self, args: &[&str]) -> Option<Value> {
        let mut full = vec!["get", "-o", "json"];
        full.extend_from_slice(args);
        let mut attempt = 1;
        loop {
            let out = self.kubectl_once(&full, None);
            if out.status.success() {
                return Some(serde_json::from_slice(&out.stdout).unwrap());
            }
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("NotFound") {
                return None;
            }
            assert!(attempt < 4, "kubectl get {args:?}: {err}");
            eprintln!("    kubectl get {args:?} failed (attempt {attempt}), retrying: {err}");
            attempt += 1;
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn items(&self, args: &[&str]) -> Vec<Value> {
        self.get(args).unwrap()["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn socket(&self, node: &str) -> PathBuf {
        self.path(&format!("{node}/csi.sock"))
    }

    fn kubelet_dir(&self, node: &str) -> PathBuf {
        self.path(&format!("{node}/kubelet"))
    }

    /// Renders a kustomization with a server-side dry run (schema, admission and RBAC checks
    /// against the real API server) and returns the objects.
    fn dry_run_kustomize(&self, dir: &Path) -> Vec<Value> {
        let out = self.kubectl(&[
            "apply",
            "--dry-run=server",
            "-o",
            "json",
            "-k",
            dir.to_str().unwrap(),
        ]);
        list_items(&out.stdout)
    }
}

/// The objects of a `kubectl -o json` answer (a List or a single object).
fn list_items(stdout: &[u8]) -> Vec<Value> {
    let v: Value = serde_json::from_slice(stdout).expect("kubectl json");
    match v["items"].as_array() {
        Some(items) => items.clone(),
        None => vec![v],
    }
}

fn kind_names(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn step(name: &str) -> Instant {
    eprintln!("==> e2e: {name}");
    Instant::now()
}

fn done(name: &str, started: Instant) {
    eprintln!("<== e2e: {name}: {:.1} s", started.elapsed().as_secs_f64());
}

/// Starts everything up to (not including) the scenarios.
fn start_cluster() -> Cluster {
    let dir = tempfile::Builder::new()
        .prefix("k8scsi-e2e-")
        .tempdir()
        .unwrap();
    let bin = tools_dir().join("bin");
    let mut c = Cluster {
        procs: Vec::new(),
        bin,
        admin: dir.path().join("admin.kubeconfig"),
        sidecar_kubeconfig: dir.path().join("sidecar.kubeconfig"),
        dir,
    };

    let t = step("etcd");
    let etcd_client = free_port();
    let etcd_peer = free_port();
    let args: Vec<String> = vec![
        "--name=e2e".into(),
        format!("--data-dir={}", c.path("etcd").display()),
        format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
        format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
        format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
        format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
        format!("--initial-cluster=e2e=http://127.0.0.1:{etcd_peer}"),
        // Throwaway data: no fsync, so the bulk scenario measures k8scsi and the sidecars,
        // not this disk.
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ];
    c.spawn("etcd", &c.tool("etcd"), &args, &[]);
    wait_for("etcd to listen", STARTUP, || {
        std::net::TcpStream::connect(("127.0.0.1", etcd_client))
            .ok()
            .map(|_| ())
    });
    done("etcd", t);

    let t = step("kube-apiserver");
    let sa_key = c.path("sa.key");
    let sa_pub = c.path("sa.pub");
    run_ok(
        Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048"),
    );
    run_ok(
        Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&sa_key)
            .arg("-out")
            .arg(&sa_pub),
    );
    // Static tokens: an admin (system:masters) for the test and the control plane, and the
    // deployment's ServiceAccount identity for the sidecars, so they get exactly the RBAC of
    // deploy/kustomize/base.
    let admin_token = "e2e-admin-token";
    let sidecar_token = "e2e-sidecar-token";
    std::fs::write(
        c.path("tokens.csv"),
        format!(
            "{admin_token},e2e-admin,e2e-admin,system:masters\n\
             {sidecar_token},system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT},e2e-sa,\
             \"system:serviceaccounts,system:serviceaccounts:{NAMESPACE}\"\n"
        ),
    )
    .unwrap();
    let api_port = free_port();
    let server = format!("https://127.0.0.1:{api_port}");
    std::fs::write(&c.admin, kubeconfig(&server, admin_token)).unwrap();
    std::fs::write(&c.sidecar_kubeconfig, kubeconfig(&server, sidecar_token)).unwrap();
    let args: Vec<String> = vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={api_port}"),
        format!("--cert-dir={}", c.path("apiserver-certs").display()),
        format!("--token-auth-file={}", c.path("tokens.csv").display()),
        "--authorization-mode=RBAC".into(),
        "--service-account-issuer=https://kubernetes.default.svc".into(),
        format!("--service-account-key-file={}", sa_pub.display()),
        format!("--service-account-signing-key-file={}", sa_key.display()),
        "--service-cluster-ip-range=10.96.0.0/24".into(),
        "--allow-privileged=true".into(),
        "--v=1".into(),
    ];
    c.spawn("kube-apiserver", &c.tool("kube-apiserver"), &args, &[]);
    wait_for("kube-apiserver /readyz", STARTUP, || {
        c.check_alive();
        let out = c
            .kubectl_cmd(&["get", "--raw", "/readyz"])
            .output()
            .unwrap();
        (out.status.success() && out.stdout.starts_with(b"ok")).then_some(())
    });
    // RBAC bootstrap policy (system:* roles) must exist before controllers start.
    wait_for("bootstrap ClusterRoles", STARTUP, || {
        c.get(&["clusterrole", "system:controller:persistent-volume-binder"])
    });
    done("kube-apiserver", t);

    let t = step("kube-controller-manager");
    let args: Vec<String> = vec![
        format!("--kubeconfig={}", c.admin.display()),
        "--controllers=persistentvolume-binder-controller,persistentvolume-expander-controller,\
         persistentvolume-protection-controller,persistentvolumeclaim-protection-controller"
            .into(),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", free_port()),
        "--v=1".into(),
    ];
    c.spawn(
        "kube-controller-manager",
        &c.tool("kube-controller-manager"),
        &args,
        &[],
    );
    done("kube-controller-manager", t);

    let t = step("snapshot CRDs and deploy/kustomize/base");
    c.kubectl(&[
        "apply",
        "-f",
        tools_dir().join("snapshot-crds").to_str().unwrap(),
    ]);
    c.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=120s",
        "crd/volumesnapshots.snapshot.storage.k8s.io",
        "crd/volumesnapshotcontents.snapshot.storage.k8s.io",
        "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
    ]);
    // Real apply: the namespace, CSIDriver, ServiceAccount, RBAC and StorageClasses the sidecars
    // and scenarios use.
    c.kubectl(&[
        "apply",
        "-k",
        repo_root().join("deploy/kustomize/base").to_str().unwrap(),
    ]);
    c.kubectl(&[
        "apply",
        "-k",
        repo_root()
            .join("deploy/kustomize/snapshots")
            .to_str()
            .unwrap(),
    ]);
    done("snapshot CRDs and deploy/kustomize/base", t);

    // Nodes as the kubelet would register them, and CSINodes as node-driver-registrar + kubelet
    // would write them. A Pod object per node stands in for the DaemonSet pod (the provisioner
    // with --capacity-ownerref-level=0 makes it the owner of its CSIStorageCapacity objects).
    let t = step("Node, CSINode and Pod objects");
    for node in NODES {
        c.apply_json(&json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {
                "kubernetes.io/hostname": node, TOPOLOGY_KEY: node}},
        }));
        c.apply_json(&json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
            "metadata": {"name": node},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": node, "topologyKeys": [TOPOLOGY_KEY]}]},
        }));
        c.apply_json(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("k8scsi-{node}"), "namespace": NAMESPACE},
            "spec": {
                "nodeName": node,
                "serviceAccountName": SERVICE_ACCOUNT,
                "automountServiceAccountToken": false,
                "containers": [{"name": "k8scsi", "image": "ghcr.io/k8scsi/k8scsi:0.1.0"}],
            },
        }));
    }
    done("Node, CSINode and Pod objects", t);

    let t = step("k8scsi servers");
    for node in NODES {
        std::fs::create_dir_all(c.kubelet_dir(node).join("pods")).unwrap();
        let args: Vec<String> = vec![
            "serve".into(),
            "--mode=all".into(),
            format!("--endpoint=unix://{}", c.socket(node).display()),
            format!("--node-id={node}"),
            format!("--state-dir={}", c.path(&format!("{node}/state")).display()),
            format!("--data-dir={}", c.path(&format!("{node}/data")).display()),
            format!("--kubelet-dir={}", c.kubelet_dir(node).display()),
        ];
        c.spawn(
            &format!("k8scsi-{node}"),
            Path::new(common::BINARY),
            &args,
            &[],
        );
    }
    for node in NODES {
        let sock = c.socket(node);
        wait_for("k8scsi socket", STARTUP, || {
            c.check_alive();
            std::os::unix::net::UnixStream::connect(&sock)
                .ok()
                .map(|_| ())
        });
    }
    done("k8scsi servers", t);

    let t = step("sidecars with the overlays' flags");
    let distributed =
        c.dry_run_kustomize(&repo_root().join("deploy/kustomize/overlays/distributed"));
    let single = c.dry_run_kustomize(&repo_root().join("deploy/kustomize/overlays/single-node"));
    let kubeconfig_arg = format!("--kubeconfig={}", c.sidecar_kubeconfig.display());
    for node in NODES {
        let mut args = container_args(
            &distributed,
            "DaemonSet",
            "csi-provisioner",
            &c.socket(node),
        );
        args.push(kubeconfig_arg.clone());
        let pod = format!("k8scsi-{node}");
        let env = [
            ("NODE_NAME", node),
            ("NAMESPACE", NAMESPACE),
            ("POD_NAME", pod.as_str()),
        ];
        c.spawn(
            &format!("csi-provisioner-{node}"),
            &c.tool("csi-provisioner"),
            &args,
            &env,
        );
    }
    // One resizer, next to node-1's driver, as in the single-node overlay (see deploy/README.md
    // for why a resizer only reaches its own node's volumes).
    let mut args = container_args(&single, "DaemonSet", "csi-resizer", &c.socket(NODES[0]));
    args.push(kubeconfig_arg);
    c.spawn("csi-resizer", &c.tool("csi-resizer"), &args, &[]);
    done("sidecars with the overlays' flags", t);
    c
}

/// Blocking gRPC helpers against one node's k8scsi.
struct Csi {
    rt: tokio::runtime::Runtime,
}

impl Csi {
    fn new() -> Csi {
        Csi {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn controller(&self, socket: &Path) -> ControllerClient<tonic::transport::Channel> {
        let ch = self
            .rt
            .block_on(connect(&Endpoint::Unix(socket.to_path_buf())))
            .unwrap();
        ControllerClient::new(ch)
    }

    fn node(&self, socket: &Path) -> NodeClient<tonic::transport::Channel> {
        let ch = self
            .rt
            .block_on(connect(&Endpoint::Unix(socket.to_path_buf())))
            .unwrap();
        NodeClient::new(ch)
    }

    /// Volume ID -> capacity in bytes, from ListVolumes.
    fn volumes(&self, socket: &Path) -> std::collections::BTreeMap<String, i64> {
        let mut client = self.controller(socket);
        let mut out = std::collections::BTreeMap::new();
        let mut token = String::new();
        loop {
            let resp = self
                .rt
                .block_on(client.list_volumes(proto::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: token.clone(),
                }))
                .unwrap()
                .into_inner();
            for e in resp.entries {
                let v = e.volume.unwrap();
                out.insert(v.volume_id, v.capacity_bytes);
            }
            if resp.next_token.is_empty() {
                return out;
            }
            token = resp.next_token;
        }
    }

    fn has_capability(&self, socket: &Path, wanted: RpcType) -> bool {
        let mut client = self.controller(socket);
        let caps = self
            .rt
            .block_on(
                client.controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {}),
            )
            .unwrap()
            .into_inner()
            .capabilities;
        caps.iter().any(|c| match &c.r#type {
            Some(CapType::Rpc(rpc)) => rpc.r#type == wanted as i32,
            _ => false,
        })
    }
}

fn pvc(name: &str, class: &str, size: &str, selected_node: Option<&str>) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(node) = selected_node {
        annotations.insert("volume.kubernetes.io/selected-node".into(), json!(node));
    }
    json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "resources": {"requests": {"storage": size}},
        },
    })
}

fn storage_class(name: &str, binding: &str, reclaim: &str) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": DRIVER,
        "parameters": {"type": "dir", "enforceCapacity": "false"},
        "volumeBindingMode": binding,
        "reclaimPolicy": reclaim,
        "allowVolumeExpansion": true,
    })
}

/// Waits until the PVC is Bound and returns its PV.
fn wait_bound(c: &mut Cluster, name: &str, timeout: Duration) -> Value {
    let pv_name = wait_for(&format!("PVC {name} Bound"), timeout, || {
        c.check_alive();
        let pvc = c.get(&["pvc", "-n", "default", name])?;
        (pvc["status"]["phase"] == "Bound")
            .then(|| pvc["spec"]["volumeName"].as_str().unwrap().to_string())
    });
    c.get(&["pv", &pv_name]).expect("bound PV exists")
}

/// The node named in a PV's node affinity for our topology key.
fn pv_node(pv: &Value) -> String {
    let terms = &pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"];
    let expr = terms[0]["matchExpressions"]
        .as_array()
        .expect("PV has node affinity")
        .iter()
        .find(|e| e["key"] == TOPOLOGY_KEY)
        .expect("PV node affinity uses the k8scsi topology key");
    assert_eq!(expr["operator"], "In");
    let values = expr["values"].as_array().unwrap();
    assert_eq!(values.len(), 1, "one node per PV: {pv}");
    values[0].as_str().unwrap().to_string()
}

fn volume_handle(pv: &Value) -> String {
    assert_eq!(pv["spec"]["csi"]["driver"], DRIVER);
    pv["spec"]["csi"]["volumeHandle"]
        .as_str()
        .unwrap()
        .to_string()
}

fn capacity_bytes(quantity: &str) -> i64 {
    k8scsi::units::parse_size(quantity).unwrap_or_else(|e| panic!("quantity {quantity}: {e}"))
        as i64
}

/// What the kubelet does for a pod using the PV: NodePublishVolume at a target under the
/// kubelet dir (with the PV's volume attributes), then NodeUnpublishVolume.
fn publish_write_unpublish(c: &Cluster, csi: &Csi, node: &str, pv: &Value) {
    let id = volume_handle(pv);
    let pod_dir = c.kubelet_dir(node).join("pods/e2e-pod/volumes");
    std::fs::create_dir_all(&pod_dir).unwrap();
    let target = pod_dir.join(pv["metadata"]["name"].as_str().unwrap());
    let context = pv["spec"]["csi"]["volumeAttributes"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let mut client = csi.node(&c.socket(node));
    csi.rt
        .block_on(client.node_publish_volume(proto::NodePublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.to_string_lossy().into_owned(),
            volume_capability: Some(mount_capability(Mode::SingleNodeWriter, vec![])),
            volume_context: context,
            ..Default::default()
        }))
        .unwrap_or_else(|s| panic!("NodePublishVolume {id} on {node}: {s}"));
    assert!(
        common::is_mounted(&target),
        "{} not mounted",
        target.display()
    );
    std::fs::write(target.join("hello"), b"from the e2e pod").unwrap();
    csi.rt
        .block_on(
            client.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.to_string_lossy().into_owned(),
            }),
        )
        .unwrap_or_else(|s| panic!("NodeUnpublishVolume {id} on {node}: {s}"));
    assert!(!common::is_mounted(&target));
}

fn delete_pvc(c: &Cluster, name: &str) {
    c.kubectl(&[
        "delete",
        "pvc",
        "-n",
        "default",
        name,
        "--wait=false",
        "--ignore-not-found",
    ]);
}

fn wait_pv_gone(c: &mut Cluster, pv: &str) {
    wait_for(&format!("PV {pv} deleted"), STEP, || {
        c.check_alive();
        c.get(&["pv", pv]).is_none().then_some(())
    });
}

#[test]
fn kubernetes_provisions_expands_snapshots_and_deletes_through_k8scsi() {
    require_root!();
    skip_unless_ready!(missing_tools());
    let total = Instant::now();
    let mut c = start_cluster();
    let csi = Csi::new();

    // ---------------------------------------------------------------- manifests (dry run)
    let t = step("server-side dry run of every overlay and the Helm chart");
    let kustomize_root = repo_root().join("deploy/kustomize");
    let mut overlays = BTreeSet::new();
    for entry in std::fs::read_dir(kustomize_root.join("overlays")).unwrap() {
        overlays.insert(entry.unwrap().path());
    }
    assert!(overlays.len() >= 3, "overlays: {overlays:?}");
    let mut rendered = std::collections::BTreeMap::new();
    for overlay in &overlays {
        let objects = c.dry_run_kustomize(overlay);
        let name = overlay.file_name().unwrap().to_string_lossy().into_owned();
        eprintln!("    overlay {name}: {} objects accepted", objects.len());
        rendered.insert(name, objects);
    }
    let helm = |values: &[&str]| -> Vec<Value> {
        let mut cmd = Command::new(c.tool("helm"));
        cmd.args(["template", "k8scsi", "--namespace", NAMESPACE])
            // helm assumes Kubernetes v1.20 without a cluster; the chart needs >= 1.34.
            .args(["--kube-version", "v1.36.3"])
            .arg(repo_root().join("deploy/helm/k8scsi"))
            .args(values.iter().flat_map(|v| ["--set", v]));
        let yaml = run_ok(&mut cmd).stdout;
        let out = c.kubectl_stdin(
            &["apply", "--dry-run=server", "-o", "json", "-f", "-"],
            &String::from_utf8(yaml).unwrap(),
        );
        list_items(&out.stdout)
    };
    for (mode, overlay) in [
        ("distributed", "distributed"),
        ("single-node", "single-node"),
        ("shared", "shared"),
    ] {
        // Chart defaults (snapshots on, like the overlays) plus the VolumeSnapshotClass, which
        // the overlays leave to the `snapshots` add-on; the CRDs are installed here.
        let chart = helm(&[
            &format!("mode={mode}"),
            "snapshots.volumeSnapshotClass=true",
        ]);
        assert!(
            chart
                .iter()
                .any(|o| o["kind"] == "VolumeSnapshotClass" && o["driver"] == DRIVER),
            "helm mode={mode}: VolumeSnapshotClass"
        );
        // Same containers with the same images, flags and env (so the sidecar flags the
        // scenarios run with from the overlays are also the chart's).
        assert_eq!(
            workload_containers(&chart),
            workload_containers(&rendered[overlay]),
            "containers of helm mode={mode} vs overlay {overlay}"
        );
        let chart_names = kind_names(&chart);
        let overlay_names = kind_names(&rendered[overlay]);
        // The chart renders every object of the matching overlay except the Namespace (Helm
        // installs into an existing one: `helm install --create-namespace`).
        let missing: Vec<_> = overlay_names
            .iter()
            .filter(|n| !n.starts_with("Namespace/") && !chart_names.contains(*n))
            .collect();
        assert!(
            missing.is_empty(),
            "helm mode={mode} lacks objects of overlay {overlay}: {missing:?}"
        );
        // Same CSIDriver spec.
        let driver = |objs: &[Value]| {
            objs.iter()
                .find(|o| o["kind"] == "CSIDriver")
                .map(|o| o["spec"].clone())
                .unwrap()
        };
        assert_eq!(
            driver(&chart),
            driver(&rendered[overlay]),
            "CSIDriver of mode {mode}"
        );
        eprintln!("    helm mode={mode}: {} objects accepted", chart.len());
    }
    // Another driver name reaches the CSIDriver and the kubelet registration path. (Classes are
    // left out: the base's classes exist for real here and `provisioner` is immutable.)
    let renamed = helm(&[
        "driverName=example.k8scsi.io",
        "backends.dir.enabled=false",
        "backends.loop.enabled=false",
    ]);
    assert!(
        renamed
            .iter()
            .any(|o| o["kind"] == "CSIDriver" && o["metadata"]["name"] == "example.k8scsi.io")
    );
    assert!(
        renamed.iter().all(|o| o["kind"] != "StorageClass"),
        "backends disabled"
    );
    let registrar = container_args(
        &renamed,
        "DaemonSet",
        "node-driver-registrar",
        Path::new("/"),
    );
    assert!(
        registrar.contains(
            &"--kubelet-registration-path=/var/lib/kubelet/plugins/example.k8scsi.io/csi.sock"
                .to_string()
        ),
        "{registrar:?}"
    );
    done("server-side dry run of every overlay and the Helm chart", t);

    // ------------------------------------------------------- Immediate binding
    let t = step("Immediate StorageClass + PVC -> PV created by k8scsi and bound");
    c.apply_json(&storage_class("e2e-immediate", "Immediate", "Delete"));
    c.apply_json(&pvc("immediate", "e2e-immediate", "1Gi", None));
    let pv = wait_bound(&mut c, "immediate", STEP);
    let node = pv_node(&pv);
    let id = volume_handle(&pv);
    assert_eq!(pv["spec"]["capacity"]["storage"], "1Gi");
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete");
    assert!(
        csi.volumes(&c.socket(&node)).contains_key(&id),
        "{id} not on {node}, the node of its PV"
    );
    publish_write_unpublish(&c, &csi, &node, &pv);
    eprintln!("    PV {} on {node}: {id}", pv["metadata"]["name"]);
    done(
        "Immediate StorageClass + PVC -> PV created by k8scsi and bound",
        t,
    );

    // --------------------------------------------------- WaitForFirstConsumer
    let t = step("WaitForFirstConsumer: selected-node decides the topology");
    // The base's example class `k8scsi` (WaitForFirstConsumer, dir, unenforced).
    c.apply_json(&pvc("wffc", "k8scsi", "1Gi", None));
    wait_for("WaitForFirstConsumer event", STEP, || {
        let events = c.items(&[
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.name=wffc",
        ]);
        events
            .iter()
            .any(|e| e["reason"] == "WaitForFirstConsumer")
            .then_some(())
    });
    let unbound = c.get(&["pvc", "-n", "default", "wffc"]).unwrap();
    assert_eq!(unbound["status"]["phase"], "Pending");
    // What the scheduler does once it picked a node for the pod.
    c.kubectl(&[
        "annotate",
        "pvc",
        "-n",
        "default",
        "wffc",
        "--overwrite",
        "volume.kubernetes.io/selected-node=node-2",
    ]);
    let wffc_pv = wait_bound(&mut c, "wffc", STEP);
    assert_eq!(pv_node(&wffc_pv), "node-2");
    let wffc_id = volume_handle(&wffc_pv);
    assert!(csi.volumes(&c.socket("node-2")).contains_key(&wffc_id));
    assert!(!csi.volumes(&c.socket("node-1")).contains_key(&wffc_id));
    publish_write_unpublish(&c, &csi, "node-2", &wffc_pv);
    // What the scheduler would have used to pick the node: each node's provisioner publishes a
    // CSIStorageCapacity for the class, for its own topology segment, owned by its Pod.
    wait_for(
        "CSIStorageCapacity for class k8scsi on every node",
        STEP,
        || {
            let caps = c.items(&["csistoragecapacities", "-n", NAMESPACE]);
            let nodes: BTreeSet<&str> = caps
                .iter()
                .filter(|o| o["storageClassName"] == "k8scsi" && o["capacity"].is_string())
                .filter(|o| o["metadata"]["ownerReferences"][0]["kind"] == "Pod")
                .filter_map(|o| o["nodeTopology"]["matchLabels"][TOPOLOGY_KEY].as_str())
                .collect();
            (nodes == BTreeSet::from(NODES)).then_some(())
        },
    );
    done(
        "WaitForFirstConsumer: selected-node decides the topology",
        t,
    );

    // ------------------------------------------------------------------ resize
    let t = step("PVC resize -> ControllerExpandVolume -> larger PV");
    c.apply_json(&pvc("grow", "k8scsi", "1Gi", Some("node-1")));
    let grow_pv = wait_bound(&mut c, "grow", STEP);
    let grow_id = volume_handle(&grow_pv);
    let grow_pv_name = grow_pv["metadata"]["name"].as_str().unwrap().to_string();
    c.kubectl(&[
        "patch",
        "pvc",
        "-n",
        "default",
        "grow",
        "--type=merge",
        "-p",
        r#"{"spec":{"resources":{"requests":{"storage":"3Gi"}}}}"#,
    ]);
    wait_for("PV capacity 3Gi", STEP, || {
        c.check_alive();
        let pv = c.get(&["pv", &grow_pv_name])?;
        (pv["spec"]["capacity"]["storage"] == "3Gi").then_some(())
    });
    assert_eq!(
        csi.volumes(&c.socket("node-1"))[&grow_id],
        capacity_bytes("3Gi"),
        "k8scsi's own record of {grow_id}"
    );
    // Directory volumes need no node-side step, so the resizer completes the PVC too.
    wait_for("PVC status capacity 3Gi", STEP, || {
        let pvc = c.get(&["pvc", "-n", "default", "grow"])?;
        (pvc["status"]["capacity"]["storage"] == "3Gi").then_some(())
    });
    done("PVC resize -> ControllerExpandVolume -> larger PV", t);

    // --------------------------------------------------------------- snapshots
    assert!(
        csi.has_capability(&c.socket("node-1"), RpcType::CreateDeleteSnapshot),
        "k8scsi must advertise CREATE_DELETE_SNAPSHOT"
    );
    snapshot_scenario(&mut c, &csi);

    // ---------------------------------------------------------- reclaim policy
    let t = step("reclaimPolicy Delete removes the volume, Retain keeps it");
    let imm_pv = pv["metadata"]["name"].as_str().unwrap().to_string();
    delete_pvc(&c, "immediate");
    wait_pv_gone(&mut c, &imm_pv);
    assert!(
        !csi.volumes(&c.socket(&node)).contains_key(&id),
        "reclaimPolicy Delete: {id} still on {node}"
    );
    c.apply_json(&storage_class(
        "e2e-retain",
        "WaitForFirstConsumer",
        "Retain",
    ));
    c.apply_json(&pvc("retain", "e2e-retain", "1Gi", Some("node-1")));
    let retain_pv = wait_bound(&mut c, "retain", STEP);
    assert_eq!(retain_pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
    let retain_id = volume_handle(&retain_pv);
    let retain_pv_name = retain_pv["metadata"]["name"].as_str().unwrap().to_string();
    delete_pvc(&c, "retain");
    wait_for("retained PV Released", STEP, || {
        let pv = c.get(&["pv", &retain_pv_name])?;
        (pv["status"]["phase"] == "Released").then_some(())
    });
    assert!(
        csi.volumes(&c.socket("node-1")).contains_key(&retain_id),
        "reclaimPolicy Retain: {retain_id} was deleted"
    );
    // An administrator removes a retained PV by hand; the storage stays until deleted too.
    c.kubectl(&[
        "delete",
        "pv",
        &retain_pv_name,
        "--wait=true",
        "--timeout=120s",
    ]);
    assert!(csi.volumes(&c.socket("node-1")).contains_key(&retain_id));
    done(
        "reclaimPolicy Delete removes the volume, Retain keeps it",
        t,
    );

    bulk_scenario(&mut c, &csi);

    // Every remaining claim goes, and with it every volume (reclaimPolicy Delete).
    let t = step("cleanup through Kubernetes");
    for name in ["wffc", "grow"] {
        delete_pvc(&c, name);
    }
    wait_for("all Delete-policy PVs gone", STEP, || {
        c.check_alive();
        c.items(&["pv"]).is_empty().then_some(())
    });
    assert_eq!(
        csi.volumes(&c.socket("node-1")).keys().collect::<Vec<_>>(),
        vec![&retain_id],
        "only the retained volume is left on node-1"
    );
    assert!(csi.volumes(&c.socket("node-2")).is_empty());
    done("cleanup through Kubernetes", t);

    c.check_alive();
    // The base's RBAC was enough: no sidecar was refused anything along the way.
    for p in c.procs.iter().filter(|p| p.name.starts_with("csi-")) {
        let log = std::fs::read_to_string(&p.log).unwrap();
        // csi-snapshotter probes for group-snapshot CRDs with a list and turns the feature off
        // when refused; k8scsi has no group snapshots, so the RBAC deliberately omits them.
        let refused: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("is forbidden"))
            .filter(|l| !l.contains("disabling the VolumeGroupSnapshot feature"))
            .collect();
        assert!(
            refused.is_empty(),
            "{} was refused by RBAC:\n{}",
            p.name,
            refused.join("\n")
        );
    }
    // Measured memory, for sizing the manifests' requests and limits.
    for p in &c.procs {
        if let Some(kib) = p.peak_rss_kib() {
            eprintln!(
                "BENCH e2e: peak RSS {:<26} {:>6.1} MiB",
                p.name,
                kib as f64 / 1024.0
            );
        }
    }
    eprintln!(
        "e2e: all scenarios passed in {:.1} s",
        total.elapsed().as_secs_f64()
    );
}

/// VolumeSnapshot -> ready -> restore into a new PVC, with the distributed overlay's snapshotter
/// (one per node, `--node-deployment`) and snapshot-controller as deploy/README.md installs it.
/// The volume lives on node-2, so the node-1 snapshotter must leave it alone and node-2's must
/// take it: a snapshotter that is not node-aware would send CreateSnapshot to the wrong k8scsi.
fn snapshot_scenario(c: &mut Cluster, csi: &Csi) {
    let t = step("VolumeSnapshot -> ready -> restore into a new PVC");
    let admin = format!("--kubeconfig={}", c.admin.display());
    c.spawn(
        "snapshot-controller",
        &c.tool("snapshot-controller"),
        &[
            admin,
            "--leader-election=false".into(),
            // deploy/README.md: required by the distributed overlay's per-node snapshotters.
            "--enable-distributed-snapshotting=true".into(),
        ],
        &[],
    );
    let distributed =
        c.dry_run_kustomize(&repo_root().join("deploy/kustomize/overlays/distributed"));
    for node in NODES {
        let mut args = container_args(
            &distributed,
            "DaemonSet",
            "csi-snapshotter",
            &c.socket(node),
        );
        args.push(format!("--kubeconfig={}", c.sidecar_kubeconfig.display()));
        c.spawn(
            &format!("csi-snapshotter-{node}"),
            &c.tool("csi-snapshotter"),
            &args,
            &[("NODE_NAME", node)],
        );
    }
    let node = "node-2";
    c.apply_json(&pvc("origin", "k8scsi", "1Gi", Some(node)));
    let origin_pv = wait_bound(c, "origin", STEP);
    assert_eq!(pv_node(&origin_pv), node);
    publish_write_unpublish(c, csi, node, &origin_pv);
    c.apply_json(&json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "snap", "namespace": "default"},
        "spec": {
            "volumeSnapshotClassName": "k8scsi",
            "source": {"persistentVolumeClaimName": "origin"},
        },
    }));
    let snap = wait_for("VolumeSnapshot readyToUse", STEP, || {
        c.check_alive();
        let s = c.get(&["volumesnapshot", "-n", "default", "snap"])?;
        (s["status"]["readyToUse"] == true).then_some(s)
    });
    let content_name = snap["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .unwrap()
        .to_string();
    let content = c
        .get(&["volumesnapshotcontent", &content_name])
        .unwrap_or_else(|| panic!("VolumeSnapshotContent {content_name}"));
    // snapshot-controller routed it to the volume's node, and that node's snapshotter took it.
    assert_eq!(
        content["metadata"]["labels"]["snapshot.storage.kubernetes.io/managed-by"], node,
        "{content}"
    );
    assert!(content["status"]["snapshotHandle"].is_string(), "{content}");
    let mut restore = pvc("restored", "k8scsi", "1Gi", Some(node));
    restore["spec"]["dataSource"] = json!({
        "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"});
    c.apply_json(&restore);
    let restored_pv = wait_bound(c, "restored", STEP);
    let restored_id = volume_handle(&restored_pv);
    assert!(csi.volumes(&c.socket(node)).contains_key(&restored_id));
    for name in ["restored", "origin"] {
        delete_pvc(c, name);
    }
    c.kubectl(&[
        "delete",
        "volumesnapshot",
        "-n",
        "default",
        "snap",
        "--ignore-not-found",
    ]);
    wait_pv_gone(c, restored_pv["metadata"]["name"].as_str().unwrap());
    wait_pv_gone(c, origin_pv["metadata"]["name"].as_str().unwrap());
    // deletionPolicy Delete: the content goes only after node-2's snapshotter had DeleteSnapshot
    // succeed (it holds a finalizer until then).
    wait_for("VolumeSnapshotContent deleted", STEP, || {
        c.check_alive();
        c.get(&["volumesnapshotcontent", &content_name])
            .is_none()
            .then_some(())
    });
    done("VolumeSnapshot -> ready -> restore into a new PVC", t);
}

/// Many PVCs at once, spread over both nodes as a scheduler would, all bound; then all deleted.
fn bulk_scenario(c: &mut Cluster, csi: &Csi) {
    let n: usize = std::env::var("K8SCSI_E2E_PVCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BULK_PVCS);
    let t = step(&format!("{n} PVCs at once"));
    let items: Vec<Value> = (0..n)
        .map(|i| {
            pvc(
                &format!("bulk-{i:03}"),
                "k8scsi",
                "64Mi",
                Some(NODES[i % 2]),
            )
        })
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let started = Instant::now();
    // Server-side apply: one request per object like `create`, but idempotent if retried.
    c.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &list.to_string());
    wait_for(&format!("{n} PVCs Bound"), BULK, || {
        c.check_alive();
        let bound = c
            .items(&["pvc", "-n", "default"])
            .iter()
            .filter(|p| {
                p["metadata"]["name"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("bulk-"))
                    && p["status"]["phase"] == "Bound"
            })
            .count();
        (bound == n).then_some(())
    });
    let bind_secs = started.elapsed().as_secs_f64();
    let per_node: Vec<usize> = NODES
        .iter()
        .map(|node| csi.volumes(&c.socket(node)).len())
        .collect();
    // Each node holds its half of the bulk volumes (plus the earlier scenarios' volumes).
    assert!(per_node[0] >= n / 2 && per_node[1] >= n / 2, "{per_node:?}");
    eprintln!(
        "BENCH e2e: {n} PVCs bound in {bind_secs:.1} s ({:.1} PVC/s), volumes per node {per_node:?}",
        n as f64 / bind_secs
    );

    let started = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("bulk-{i:03}")).collect();
    let mut args = vec![
        "delete",
        "pvc",
        "-n",
        "default",
        "--wait=false",
        "--ignore-not-found",
    ];
    args.extend(names.iter().map(String::as_str));
    c.kubectl(&args);
    wait_for(&format!("{n} bulk PVs deleted"), BULK, || {
        c.check_alive();
        let left = c
            .items(&["pv"])
            .iter()
            .filter(|pv| {
                pv["spec"]["claimRef"]["name"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("bulk-"))
            })
            .count();
        (left == 0).then_some(())
    });
    eprintln!(
        "BENCH e2e: {n} PVCs deleted (PVs and volumes gone) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    done(&format!("{n} PVCs at once"), t);
}
