//! A private Dovecot instance per test, standing in for Stalwart as the backend.
//!
//! Every instance gets its own temporary directory holding the configuration
//! (the system `/etc/dovecot` is never read), sockets, state, logs and mail,
//! and its own loopback ports, so tests running in parallel threads each get a
//! separate server. Logins as `<user>%proxy@example.org` with the master secret
//! reach `<user>`'s mailbox, which is the wire behaviour Portcullis relies on.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::ports::free_ports;
use super::smtpsink::{SinkMessage, SmtpSink};

/// Name of the master account the proxy logs in with.
pub const MASTER_USER: &str = "proxy@example.org";
/// Master secret used unless a test picks another one.
pub const DEFAULT_MASTER_SECRET: &str = "master-secret-for-tests";
/// The users every instance knows, as (login, password).
pub const TEST_USERS: &[(&str, &str)] = &[
    ("alice@example.org", "alice-password"),
    ("bob@example.org", "bob-password"),
];

/// Prefix of every instance's directory; also what the stale-instance reaper looks for.
const DIR_PREFIX: &str = "dvh-";
/// How long to wait for Dovecot's IMAP greeting after spawning it.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the `saw_*_login` helpers wait for the log line to be written.
const LOG_WAIT: Duration = Duration::from_secs(3);

/// PEM files for Dovecot's TLS listeners.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate (leaf) for `localhost` and 127.0.0.1.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that issued `cert`: what clients should trust.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// Writes a fresh test CA and a server certificate it issued into `dir`.
    ///
    /// A CA plus a leaf rather than one self-signed certificate, because
    /// webpki (rustls) refuses a CA certificate used as the server's own and
    /// OpenSSL wants a CA as trust anchor. Uses the `openssl` command
    /// (Debian's `openssl` package) so the harness needs no crypto crate.
    pub fn generate(dir: &Path) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join("tls-cert.pem"),
            key: dir.join("tls-key.pem"),
            ca: dir.join("tls-ca.pem"),
        };
        let ca_key = dir.join("tls-ca-key.pem");
        let csr = dir.join("tls-cert.csr");
        let ext = dir.join("tls-cert.ext");
        fs::write(
            &ext,
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1\n",
        )
        .expect("write certificate extensions");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(|c| {
            c.args([
                "req",
                "-x509",
                "-days",
                "2",
                "-subj",
                "/CN=Portcullis test CA",
            ])
            .args(ec)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&files.ca)
        });
        openssl(|c| {
            c.args(["req", "-new", "-subj", "/CN=localhost"])
                .args(ec)
                .arg("-keyout")
                .arg(&files.key)
                .arg("-out")
                .arg(&csr)
        });
        let serial = format!("0x{:x}", std::process::id() as u128 + now_nanos());
        openssl(|c| {
            c.args(["x509", "-req", "-days", "2", "-set_serial", &serial])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&files.ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&files.cert)
        });
        files
    }
}

/// Runs one `openssl` command built by `build`; panics with its stderr on failure.
fn openssl(build: impl FnOnce(&mut Command) -> &mut Command) {
    let mut cmd = Command::new("openssl");
    let out = build(&mut cmd)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// TCP ports of one instance, all on 127.0.0.1.
///
/// The `*_tls` ports exist only with TLS enabled (implicit TLS), the
/// `*_haproxy` ones only with [`DovecotBuilder::haproxy_listeners`]; those
/// expect a PROXY v1/v2 header first, like Stalwart behind Portcullis.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ports {
    pub imap: u16,
    pub pop3: u16,
    pub submission: u16,
    pub sieve: u16,
    pub imap_tls: Option<u16>,
    pub pop3_tls: Option<u16>,
    pub submission_tls: Option<u16>,
    pub imap_haproxy: Option<u16>,
    pub pop3_haproxy: Option<u16>,
    pub submission_haproxy: Option<u16>,
    pub sieve_haproxy: Option<u16>,
}

/// One `Login:` line of a login process, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginRecord {
    /// `imap`, `pop3`, `submission` or `managesieve`.
    pub service: String,
    /// The account whose mailbox was opened (the target of a master login).
    pub user: String,
    /// The identity whose password was checked: the master user for a master login.
    pub auth_user: String,
    /// SASL mechanism as Dovecot names it (`PLAIN`, `LOGIN`; `USER/PASS` is `PLAIN`).
    pub method: String,
    /// Client IP Dovecot saw (the PROXY header's source on haproxy listeners).
    pub rip: String,
    /// Dovecot's session id, also found on the matching `auth:` lines.
    pub session: String,
    /// The whole log line.
    pub line: String,
}

impl LoginRecord {
    /// The master user when this login used one.
    pub fn master_user(&self) -> Option<&str> {
        (self.auth_user != self.user).then_some(self.auth_user.as_str())
    }
}

/// One pre-login rawlog (what a client and Dovecot's login process exchanged
/// before the hand-off), with Dovecot's per-line timestamps removed.
#[derive(Clone, Debug)]
pub struct Rawlog {
    /// File stem, `<date>-<time>.<pid>.<n>` (pid of the login process).
    pub name: String,
    /// Bytes the client sent, one line per protocol line.
    pub input: String,
    /// Bytes Dovecot sent.
    pub output: String,
}

/// Options for [`Dovecot`]; [`Dovecot::start`] uses the defaults.
#[derive(Clone, Debug)]
pub struct DovecotBuilder {
    master_user: String,
    master_secret: String,
    users: Vec<(String, String)>,
    tls: Option<Option<TlsFiles>>,
    haproxy: bool,
    prelogin_rawlog: bool,
    auth_failure_delay_secs: u32,
    auth_penalty: bool,
    extra_config: String,
}

impl Default for DovecotBuilder {
    fn default() -> Self {
        DovecotBuilder {
            master_user: MASTER_USER.to_string(),
            master_secret: DEFAULT_MASTER_SECRET.to_string(),
            users: TEST_USERS
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            tls: None,
            haproxy: false,
            prelogin_rawlog: false,
            auth_failure_delay_secs: 0,
            auth_penalty: false,
            extra_config: String::new(),
        }
    }
}

impl DovecotBuilder {
    /// Master secret written to the master passdb.
    pub fn master_secret(mut self, secret: impl Into<String>) -> Self {
        self.master_secret = secret.into();
        self
    }

    /// Master account name (default `proxy@example.org`).
    pub fn master_user(mut self, user: impl Into<String>) -> Self {
        self.master_user = user.into();
        self
    }

    /// Adds a user next to alice and bob.
    pub fn user(mut self, login: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.push((login.into(), password.into()));
        self
    }

    /// Enables TLS (STARTTLS offered, never required) and implicit-TLS ports,
    /// with a certificate from a test CA made at start ([`Dovecot::tls_ca`]).
    pub fn tls(mut self) -> Self {
        self.tls = Some(None);
        self
    }

    /// Enables TLS like [`Self::tls`] with the given PEM files.
    pub fn tls_files(mut self, files: TlsFiles) -> Self {
        self.tls = Some(Some(files));
        self
    }

    /// Adds one extra listener per protocol that requires a PROXY header
    /// (`haproxy = yes`), trusted from 127.0.0.0/8.
    pub fn haproxy_listeners(mut self) -> Self {
        self.haproxy = true;
        self
    }

    /// Records every pre-login session (`imap-login -R`), so a test can check
    /// the exact bytes the proxy sent, e.g. the SASL PLAIN form of its master
    /// login, which Dovecot's log cannot tell apart. The files hold secrets in
    /// clear (base64), which is fine inside the instance's temporary directory.
    pub fn prelogin_rawlog(mut self) -> Self {
        self.prelogin_rawlog = true;
        self
    }

    /// Dovecot's delay before answering a failed login (default here 0,
    /// Dovecot's own is 2 s; 2.3.19 still answers on its next 0.5 s tick).
    pub fn auth_failure_delay_secs(mut self, secs: u32) -> Self {
        self.auth_failure_delay_secs = secs;
        self
    }

    /// Keeps Dovecot's per-IP auth penalty: after a failed login from an IP,
    /// its next logins wait 2, 4, 8 then 15 s. Off by default because every
    /// test client is 127.0.0.1, so one failure would slow the next test.
    pub fn auth_penalty(mut self, on: bool) -> Self {
        self.auth_penalty = on;
        self
    }

    /// Raw configuration appended at the end of dovecot.conf (later settings win).
    pub fn extra_config(mut self, text: impl Into<String>) -> Self {
        self.extra_config.push_str(&text.into());
        self.extra_config.push('\n');
        self
    }

    /// Starts the instance, retrying with fresh ports when one was taken meanwhile.
    pub fn start(self) -> Dovecot {
        reap_stale_instances();
        let mut last_error = String::new();
        for _ in 0..5 {
            match self.try_start() {
                Ok(dovecot) => return dovecot,
                Err(StartError::PortTaken(log)) => last_error = log,
                Err(StartError::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!("Dovecot could not bind its ports after 5 tries:\n{last_error}");
    }

    fn try_start(&self) -> Result<Dovecot, StartError> {
        for (name, secret) in self
            .users
            .iter()
            .chain([&(self.master_user.clone(), self.master_secret.clone())])
        {
            assert!(
                ![name, secret]
                    .iter()
                    .any(|s| s.is_empty() || s.contains([':', '\n', '\r'])),
                "passwd-file entries cannot be empty or contain ':' or line breaks"
            );
        }
        let dir = make_instance_dir();
        let root = dir.path().to_path_buf();
        let marker = root
            .file_name()
            .and_then(|n| n.to_str())
            .expect("instance dir name")
            .to_string();
        let ids = RunAs::detect();
        for sub in ["run", "state", "mail", "home", "rawlog"] {
            fs::create_dir(root.join(sub)).expect("create instance subdir");
        }
        for sub in ["mail", "home"] {
            std::os::unix::fs::chown(root.join(sub), Some(ids.mail_uid), Some(ids.mail_gid))
                .expect("chown mail dir");
        }
        std::os::unix::fs::chown(root.join("rawlog"), Some(ids.login_uid), None)
            .expect("chown rawlog dir");
        fs::write(root.join("owner.pid"), std::process::id().to_string()).expect("owner.pid");
        let users: String = self
            .users
            .iter()
            .map(|(u, p)| format!("{u}:{{PLAIN}}{p}::::::\n"))
            .collect();
        fs::write(root.join("users"), users).expect("write users");
        fs::write(
            root.join("masters"),
            format!("{}:{{PLAIN}}{}\n", self.master_user, self.master_secret),
        )
        .expect("write masters");

        let tls = self.tls.as_ref().map(|files| match files {
            Some(files) => files.clone(),
            None => TlsFiles::generate(&root),
        });
        let ports = self.pick_ports();
        let sink = SmtpSink::start();
        let conf = root.join("dovecot.conf");
        fs::write(
            &conf,
            self.config_text(&root, &marker, &ids, &ports, tls.as_ref(), sink.port()),
        )
        .expect("write dovecot.conf");

        let stdout = fs::File::create(root.join("stdout.log")).expect("stdout.log");
        let stderr = fs::File::create(root.join("stderr.log")).expect("stderr.log");
        let child = Command::new(find_binary("dovecot"))
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                StartError::Fatal(format!("spawn dovecot (is dovecot-core installed?): {e}"))
            })?;

        let mut dovecot = Dovecot {
            child: Some(child),
            marker,
            conf,
            ports,
            master_user: self.master_user.clone(),
            master_secret: self.master_secret.clone(),
            users: self.users.clone(),
            tls,
            sink,
            dir,
        };
        match dovecot.wait_ready() {
            Ok(()) => Ok(dovecot),
            Err(diagnostics) => {
                dovecot.stop();
                if diagnostics.contains("Address already in use") {
                    Err(StartError::PortTaken(diagnostics))
                } else {
                    Err(StartError::Fatal(format!(
                        "Dovecot did not start:\n{diagnostics}"
                    )))
                }
            }
        }
    }

    fn pick_ports(&self) -> Ports {
        let mut free = free_ports(11).into_iter();
        let mut next = || free.next().expect("enough free ports");
        let mut ports = Ports {
            imap: next(),
            pop3: next(),
            submission: next(),
            sieve: next(),
            ..Ports::default()
        };
        if self.tls.is_some() {
            ports.imap_tls = Some(next());
            ports.pop3_tls = Some(next());
            ports.submission_tls = Some(next());
        }
        if self.haproxy {
            ports.imap_haproxy = Some(next());
            ports.pop3_haproxy = Some(next());
            ports.submission_haproxy = Some(next());
            ports.sieve_haproxy = Some(next());
        }
        ports
    }

    fn config_text(
        &self,
        root: &Path,
        marker: &str,
        ids: &RunAs,
        ports: &Ports,
        tls: Option<&TlsFiles>,
        sink_port: u16,
    ) -> String {
        let root = root.display();
        let mut c = format!(
            r#"# Written by the Portcullis test harness; never uses /etc/dovecot.
protocols = imap pop3 submission sieve
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
instance_name = {marker}
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
debug_log_path = {root}/dovecot.log
log_timestamp = "%Y-%m-%d %H:%M:%S "
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = 1
first_valid_gid = 1
mail_uid = {mail_uid}
mail_gid = {mail_gid}
mail_location = maildir:{root}/mail/%u
mail_home = {root}/home/%u
mail_max_userip_connections = 1000
verbose_proctitle = yes
shutdown_clients = yes

# Loopback counts as secured, so plaintext logins are fine on these ports.
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = {delay} secs
auth_verbose = yes
auth_verbose_passwords = no
auth_master_user_separator = %
# auth_user differs from user exactly when a master user logged in.
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{{session}}> auth_user=<%{{auth_user}}>

# Master first and result_success = continue: the target user must exist too.
passdb {{
  driver = passwd-file
  master = yes
  args = {root}/masters
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}

namespace inbox {{
  inbox = yes
  separator = /
  mailbox Drafts {{
    special_use = \Drafts
    auto = subscribe
  }}
  mailbox Sent {{
    special_use = \Sent
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \Trash
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \Junk
    auto = subscribe
  }}
}}

hostname = mail.example.org
postmaster_address = postmaster@example.org
submission_host = 127.0.0.1:{sink_port}
submission_relay_host = 127.0.0.1
submission_relay_port = {sink_port}
submission_relay_trusted = no

plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}

default_process_limit = 100
default_client_limit = 4096
"#,
            internal_user = ids.internal_user,
            internal_group = ids.internal_group,
            login_user = ids.login_user,
            mail_uid = ids.mail_uid,
            mail_gid = ids.mail_gid,
            delay = self.auth_failure_delay_secs,
        );

        match tls {
            Some(files) => c.push_str(&format!(
                "ssl = yes\nssl_cert = <{}\nssl_key = <{}\nssl_min_protocol = TLSv1.2\n",
                files.cert.display(),
                files.key.display()
            )),
            None => c.push_str("ssl = no\n"),
        }
        if self.haproxy {
            c.push_str("haproxy_trusted_networks = 127.0.0.0/8\n");
        }
        // anvil chroots by default, which only root may do.
        c.push_str("service anvil {\n  chroot =\n");
        if !self.auth_penalty {
            // The auth process cannot reach anvil's penalty socket, so it
            // disables the penalty (no error is logged).
            c.push_str("  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n");
        }
        c.push_str("}\n");

        let rawlog_dir = format!("{root}/rawlog");
        let services = [
            ServiceListeners {
                service: "imap",
                listener: "imap",
                port: ports.imap,
                tls_listener: Some(("imaps", ports.imap_tls)),
                haproxy_port: ports.imap_haproxy,
            },
            ServiceListeners {
                service: "pop3",
                listener: "pop3",
                port: ports.pop3,
                tls_listener: Some(("pop3s", ports.pop3_tls)),
                haproxy_port: ports.pop3_haproxy,
            },
            ServiceListeners {
                service: "submission",
                listener: "submission",
                port: ports.submission,
                tls_listener: Some(("submissions", ports.submission_tls)),
                haproxy_port: ports.submission_haproxy,
            },
            ServiceListeners {
                service: "managesieve",
                listener: "sieve",
                port: ports.sieve,
                tls_listener: None,
                haproxy_port: ports.sieve_haproxy,
            },
        ];
        for s in services {
            let service = s.service;
            c.push_str(&format!("service {service}-login {{\n"));
            // No chroot: rawlog paths stay absolute and non-root runs work.
            c.push_str("  chroot =\n");
            if self.prelogin_rawlog {
                c.push_str(&format!("  executable = {service}-login -R {rawlog_dir}\n"));
            }
            // High-performance login processes: a few long-lived ones, many clients each.
            c.push_str("  service_count = 0\n  process_min_avail = 2\n  client_limit = 1024\n");
            c.push_str(&listener_block(s.listener, s.port, ""));
            // Port 0 disables a listener; otherwise the built-in 993/995/465 would be used.
            if let Some((name, port)) = s.tls_listener {
                c.push_str(&listener_block(name, port.unwrap_or(0), "    ssl = yes\n"));
            }
            if let Some(port) = s.haproxy_port {
                let name = format!("{}_haproxy", s.listener);
                c.push_str(&listener_block(&name, port, "    haproxy = yes\n"));
            }
            c.push_str("}\n");
            c.push_str(&format!(
                "service {service} {{\n  process_limit = 1024\n}}\n"
            ));
        }
        c.push_str(&self.extra_config);
        c
    }
}

/// The listeners of one login service in the generated configuration.
struct ServiceListeners {
    service: &'static str,
    listener: &'static str,
    port: u16,
    /// Implicit-TLS listener name and its port when TLS is on.
    tls_listener: Option<(&'static str, Option<u16>)>,
    haproxy_port: Option<u16>,
}

/// An `inet_listener` block on 127.0.0.1 with extra settings lines.
fn listener_block(name: &str, port: u16, extra: &str) -> String {
    format!("  inet_listener {name} {{\n    address = 127.0.0.1\n    port = {port}\n{extra}  }}\n")
}

enum StartError {
    /// Another process took one of the ports between picking and binding.
    PortTaken(String),
    Fatal(String),
}

/// A running Dovecot; stopped (with every child process) when dropped.
pub struct Dovecot {
    child: Option<Child>,
    marker: String,
    conf: PathBuf,
    ports: Ports,
    master_user: String,
    master_secret: String,
    users: Vec<(String, String)>,
    tls: Option<TlsFiles>,
    sink: SmtpSink,
    // Last field: removed after the processes using it are gone.
    dir: TempDir,
}

impl Dovecot {
    /// Starts an instance with the default options.
    pub fn start() -> Dovecot {
        DovecotBuilder::default().start()
    }

    /// Options for an instance.
    pub fn builder() -> DovecotBuilder {
        DovecotBuilder::default()
    }

    pub fn ports(&self) -> Ports {
        self.ports
    }

    pub fn imap_port(&self) -> u16 {
        self.ports.imap
    }

    pub fn pop3_port(&self) -> u16 {
        self.ports.pop3
    }

    pub fn submission_port(&self) -> u16 {
        self.ports.submission
    }

    pub fn sieve_port(&self) -> u16 {
        self.ports.sieve
    }

    /// `127.0.0.1:<port>`, for configuring the proxy's backend.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    pub fn master_user(&self) -> &str {
        &self.master_user
    }

    pub fn master_secret(&self) -> &str {
        &self.master_secret
    }

    /// `<user>%<master>`, the login the proxy must send for `user`.
    pub fn master_login_for(&self, user: &str) -> String {
        format!("{user}%{}", self.master_user)
    }

    /// Users and passwords configured in the users' passdb.
    pub fn users(&self) -> &[(String, String)] {
        &self.users
    }

    /// Password of a configured user.
    pub fn password_of(&self, user: &str) -> &str {
        self.users
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, p)| p.as_str())
            .unwrap_or_else(|| panic!("no test user {user}"))
    }

    /// The CA certificate clients should trust (TLS instances only).
    pub fn tls_ca(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    /// The certificate, key and CA in use (TLS instances only).
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The instance's directory (config, logs, mail).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the generated dovecot.conf.
    pub fn config_path(&self) -> &Path {
        &self.conf
    }

    /// A string found in the command line of every process of this instance
    /// (the master's `-c` path and the children's `dovecot-<marker>/...` titles).
    pub fn process_marker(&self) -> &str {
        &self.marker
    }

    /// PIDs of this instance's processes still alive.
    pub fn pids(&self) -> Vec<i32> {
        pids_matching(&self.marker)
    }

    /// PID of the master process, while it runs.
    pub fn master_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The SMTP sink that submission relays to.
    pub fn sink(&self) -> &SmtpSink {
        &self.sink
    }

    /// Messages relayed by submission so far.
    pub fn sink_messages(&self) -> Vec<SinkMessage> {
        self.sink.messages()
    }

    /// The whole Dovecot log (all levels go to one file).
    pub fn log(&self) -> String {
        let mut log = fs::read(self.dir().join("dovecot.log")).unwrap_or_default();
        log.extend(fs::read(self.dir().join("stderr.log")).unwrap_or_default());
        String::from_utf8_lossy(&log).into_owned()
    }

    /// Current length of the log, to look only at what comes after with [`Self::log_since`].
    pub fn log_mark(&self) -> usize {
        fs::metadata(self.dir().join("dovecot.log")).map_or(0, |m| m.len() as usize)
    }

    /// The log written after `mark`.
    pub fn log_since(&self, mark: usize) -> String {
        let log = fs::read(self.dir().join("dovecot.log")).unwrap_or_default();
        String::from_utf8_lossy(log.get(mark..).unwrap_or_default()).into_owned()
    }

    /// Polls the log until `pred` holds; false on timeout.
    ///
    /// Dovecot writes its log through a separate process, so a line can show
    /// up a little after the client already got its answer.
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.log()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every successful login so far, from the login processes' `Login:` lines.
    pub fn logins(&self) -> Vec<LoginRecord> {
        self.log().lines().filter_map(parse_login_line).collect()
    }

    /// Successful logins into `user`'s mailbox through this instance's master user.
    pub fn master_logins(&self, user: &str) -> usize {
        self.logins()
            .iter()
            .filter(|r| r.user == user && r.master_user() == Some(self.master_user.as_str()))
            .count()
    }

    /// Successful logins of `user` with their own password.
    pub fn direct_logins(&self, user: &str) -> usize {
        self.logins()
            .iter()
            .filter(|r| r.user == user && r.auth_user == user)
            .count()
    }

    /// True once the log shows `user` logged in through the master user.
    ///
    /// Waits up to 3 s for the line, so a negative answer costs that long;
    /// use [`Self::master_logins`] to count without waiting. Dovecot logs the
    /// same line for `\0user%master\0secret` and for the authzid form
    /// `user\0master\0secret`; use [`DovecotBuilder::prelogin_rawlog`] to tell them apart.
    pub fn saw_master_login(&self, user: &str) -> bool {
        self.wait_until(|| self.master_logins(user) > 0)
    }

    /// True once the log shows `user` logged in with their own password (waits like above).
    pub fn saw_direct_login(&self, user: &str) -> bool {
        self.wait_until(|| self.direct_logins(user) > 0)
    }

    fn wait_until(&self, cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            if cond() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pre-login rawlogs of connections that sent something, oldest first
    /// (needs [`DovecotBuilder::prelogin_rawlog`]).
    pub fn prelogin_rawlogs(&self) -> Vec<Rawlog> {
        let names: Vec<String> = fs::read_dir(self.dir().join("rawlog"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".in").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let read = |name: &str, ext: &str| {
            let raw = fs::read(self.dir().join("rawlog").join(format!("{name}.{ext}")));
            String::from_utf8_lossy(&raw.unwrap_or_default()).into_owned()
        };
        let mut logs: Vec<(f64, Rawlog)> = names
            .into_iter()
            .map(|name| {
                let (input, output) = (read(&name, "in"), read(&name, "out"));
                // Several login processes write at once, so order by the
                // greeting's microsecond timestamp, not by file name.
                let started = output
                    .split_whitespace()
                    .next()
                    .and_then(|ts| ts.parse().ok())
                    .unwrap_or(f64::MAX);
                let rawlog = Rawlog {
                    input: strip_rawlog_timestamps(&input),
                    output: strip_rawlog_timestamps(&output),
                    name,
                };
                (started, rawlog)
            })
            // Connections that sent nothing, such as the harness's own readiness probe.
            .filter(|(_, r)| !r.input.is_empty())
            .collect();
        logs.sort_by(|a, b| a.0.total_cmp(&b.0));
        logs.into_iter().map(|(_, r)| r).collect()
    }

    /// Runs `doveadm -c <this config> <args>`.
    pub fn doveadm(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = Command::new(find_binary("doveadm"))
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn doveadm");
        let mut pipe = child.stdin.take().expect("doveadm stdin");
        pipe.write_all(stdin.unwrap_or_default())
            .expect("write doveadm stdin");
        drop(pipe);
        child.wait_with_output().expect("doveadm output")
    }

    /// Stores `raw_message` in `user`'s INBOX, as a delivery would.
    pub fn deliver(&self, user: &str, raw_message: &[u8]) {
        self.deliver_to(user, "INBOX", raw_message);
    }

    /// Stores `raw_message` in `user`'s `mailbox` (which must exist).
    ///
    /// Goes through `doveadm save`, so Dovecot's indexes and the mail
    /// ownership are right and the message is visible to the next SELECT.
    pub fn deliver_to(&self, user: &str, mailbox: &str, raw_message: &[u8]) {
        let out = self.doveadm(&["save", "-u", user, "-m", mailbox], Some(raw_message));
        assert!(
            out.status.success(),
            "doveadm save for {user} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Number of messages in `user`'s `mailbox`, read by doveadm.
    pub fn message_count(&self, user: &str, mailbox: &str) -> usize {
        let out = self.doveadm(
            &[
                "-f", "flow", "mailbox", "status", "-u", user, "messages", mailbox,
            ],
            None,
        );
        assert!(
            out.status.success(),
            "doveadm mailbox status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix("messages="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected doveadm output: {text}"))
    }

    /// Stops Dovecot and every process it started; waits until they are gone.
    ///
    /// Called by Drop; calling it earlier lets a test check a backend that
    /// vanished. SIGKILL, not a graceful stop: nothing here needs flushing and
    /// Dovecot's own shutdown takes about a second per instance.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The master first, so that it cannot fork replacements.
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = pids_matching(&self.marker);
            if left.is_empty() || Instant::now() >= deadline {
                break;
            }
            for pid in left {
                signal(pid, libc::SIGKILL);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the IMAP greeting; on failure returns the logs for the panic message.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = self.addr(self.ports.imap);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("dovecot exited with {status}\n{}", self.log()));
            }
            if let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                // The whole line, so that closing sends FIN rather than RST.
                let mut greeting = String::new();
                let _ = BufReader::new(stream).read_line(&mut greeting);
                if greeting.starts_with("* OK ") {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no IMAP greeting within {START_TIMEOUT:?}\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Which system users the instance runs as.
struct RunAs {
    internal_user: String,
    internal_group: String,
    login_user: String,
    login_uid: u32,
    mail_uid: u32,
    mail_gid: u32,
}

impl RunAs {
    /// As root, Debian's `dovecot`/`dovenull` users (created by dovecot-core);
    /// otherwise everything as the current user (Dovecot cannot switch users then).
    fn detect() -> RunAs {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid == 0 {
            let dovecot = passwd_entry(|name, _| name == "dovecot")
                .expect("user 'dovecot' missing: apt-get install dovecot-core");
            let dovenull = passwd_entry(|name, _| name == "dovenull")
                .expect("user 'dovenull' missing: apt-get install dovecot-core");
            RunAs {
                internal_user: "dovecot".into(),
                internal_group: group_name(dovecot.2).unwrap_or_else(|| "dovecot".into()),
                login_user: "dovenull".into(),
                login_uid: dovenull.1,
                mail_uid: dovecot.1,
                mail_gid: dovecot.2,
            }
        } else {
            let (name, uid, gid) =
                passwd_entry(|_, uid| uid == euid).expect("current user in /etc/passwd");
            RunAs {
                internal_user: name.clone(),
                internal_group: group_name(gid).expect("current group in /etc/group"),
                login_user: name,
                login_uid: uid,
                mail_uid: uid,
                mail_gid: gid,
            }
        }
    }
}

/// (name, uid, gid) of the first /etc/passwd entry matching `pred`.
fn passwd_entry(pred: impl Fn(&str, u32) -> bool) -> Option<(String, u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let (uid, gid) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
        pred(f[0], uid).then(|| (f[0].to_string(), uid, gid))
    })
}

fn group_name(gid: u32) -> Option<String> {
    let group = fs::read_to_string("/etc/group").ok()?;
    group.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.get(2)?.parse::<u32>().ok()? == gid).then(|| f[0].to_string())
    })
}

/// A short-pathed temporary directory readable by Dovecot's unprivileged users.
///
/// Short, because Dovecot's UNIX sockets live under it (108-byte path limit).
fn make_instance_dir() -> TempDir {
    let tmp = std::env::temp_dir();
    let parent = if tmp.as_os_str().len() <= 40 {
        tmp
    } else {
        PathBuf::from("/tmp")
    };
    let dir = tempfile::Builder::new()
        .prefix(DIR_PREFIX)
        .tempdir_in(parent)
        .expect("create instance dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod instance dir");
    dir
}

/// Finds a binary in PATH, then in the Debian locations (root's PATH may lack /usr/sbin).
fn find_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; errors (ESRCH) are ignored.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// PIDs whose command line contains `marker`.
fn pids_matching(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmd| String::from_utf8_lossy(&cmd).contains(marker))
                .unwrap_or(false)
        })
        .collect()
}

/// Kills instances left by test processes that died without dropping them
/// (SIGKILL, abort, or an instance kept in a `static`), and removes their dirs.
pub fn reap_stale_instances() {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // The master: `dovecot -F -c <dir>/dovecot.conf` with <dir> named dvh-*.
        let Some(conf) = args
            .iter()
            .position(|a| a == "-c")
            .and_then(|i| args.get(i + 1))
        else {
            continue;
        };
        let conf = Path::new(conf);
        let Some(dir) = conf.parent() else { continue };
        let Some(marker) = dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !args[0].ends_with("dovecot") || !marker.starts_with(DIR_PREFIX) {
            continue;
        }
        let owner_alive = fs::read_to_string(dir.join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .is_some_and(|owner| Path::new(&format!("/proc/{owner}")).exists());
        if owner_alive {
            continue;
        }
        for victim in pids_matching(marker) {
            signal(victim, libc::SIGKILL);
        }
        let _ = fs::remove_dir_all(dir);
    }
}

fn parse_login_line(line: &str) -> Option<LoginRecord> {
    let (head, rest) = line.split_once("-login: Info: Login: ")?;
    let service = head.rsplit(' ').next()?.to_string();
    let angle = |key: &str| -> Option<String> {
        let start = rest.find(&format!("{key}=<"))? + key.len() + 2;
        let len = rest[start..].find('>')?;
        Some(rest[start..start + len].to_string())
    };
    let plain = |key: &str| -> String {
        rest.split(", ")
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_default()
            .to_string()
    };
    // auth_user is the last element, so take everything up to the final '>'.
    let auth_user = rest
        .rsplit_once(", auth_user=<")
        .map(|(_, v)| v.strip_suffix('>').unwrap_or(v).to_string())?;
    Some(LoginRecord {
        service,
        user: angle("user")?,
        auth_user,
        method: plain("method"),
        rip: plain("rip"),
        session: angle("session").unwrap_or_default(),
        line: line.to_string(),
    })
}

/// Drops the `<secs>.<usecs> ` prefix Dovecot puts on every rawlog line.
fn strip_rawlog_timestamps(raw: &str) -> String {
    raw.lines()
        .map(|line| match line.split_once(' ') {
            Some((ts, rest)) if ts.bytes().all(|b| b.is_ascii_digit() || b == b'.') => rest,
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect()
}
