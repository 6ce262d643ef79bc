#!/usr/bin/env bash
# Side-by-side benchmark on loopback: direct Dovecot (the ceiling), nginx's mail proxy and
# Portcullis, both proxies in front of the same Dovecot and asking the same auth_http server.
# Writes the tables into bench/RESULTS.md (between the "comparison" markers) and prints them.
#
#   bench/compare.sh                      # the default run (about 10 minutes)
#   bench/compare.sh --duration 5 --only login --protos imap --conc "16 64"
#   bench/compare.sh --leak 600           # adds the 10-minute RSS leak loop
#
# Options:
#   --duration S     seconds per measured cell (default 10; fetch/append/retr/send use S*0.8)
#   --conc "LIST"    login concurrencies (default "1 16 64")
#   --protos "LIST"  login protocols (default "imap pop3 smtp"; pop3/smtp at --conc-other)
#   --conc-other "L" concurrencies for pop3/smtp (default "16")
#   --only "LIST"    any of login,fetch,append,retr,send,idle,http (default all)
#   --idle N         idle connections per contestant (default 3000; Dovecot allows 4096)
#   --reps N         interleaved repetitions; tables show medians (default 1)
#   --leak S         also run an S-second TLS login loop at c=16 against Portcullis, sampling RSS
#   --no-write       print only, do not touch bench/RESULTS.md
#   --keep           keep the temp dir (configs, logs, raw JSON)
#   --scheduler S    Portcullis's server.scheduler (per-core, the default, or work-stealing)
# Needs: dovecot-imapd dovecot-pop3d dovecot-submissiond, nginx libnginx-mod-mail, openssl,
# python3, cargo. Missing Debian packages are installed with apt-get (announced first) when run
# as root; otherwise the script says what to install and stops. Runs as root or as a normal user.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DURATION=10 CONC="1 16 64" PROTOS="imap pop3 smtp" CONC_OTHER="16" ONLY="login,fetch,append,retr,send,idle,http"
IDLE_N=3000 REPS=1 LEAK=0 WRITE=1 KEEP=0 SCHEDULER=per-core
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --conc) CONC=$2; shift 2 ;;
    --protos) PROTOS=$2; shift 2 ;;
    --conc-other) CONC_OTHER=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --idle) IDLE_N=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --leak) LEAK=$2; shift 2 ;;
    --no-write) WRITE=0; shift ;;
    --keep) KEEP=1; shift ;;
    --scheduler) SCHEDULER=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)"; exit 2 ;;
  esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---- prerequisites -------------------------------------------------------------------------
NGINX_MODULE=/usr/lib/nginx/modules/ngx_mail_module.so
missing=()
command -v dovecot >/dev/null || missing+=(dovecot-imapd dovecot-pop3d dovecot-submissiond)
command -v nginx >/dev/null || missing+=(nginx)
[ -f "$NGINX_MODULE" ] || missing+=(libnginx-mod-mail)
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== the benchmark needs: ${missing[*]}; installing them with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]} (apt-get install ${missing[*]})"; exit 1
  fi
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "== building (release)"
cargo build --release -q -p portcullis -p portcullis-loadgen --bins
PORTCULLIS=$REPO/target/release/portcullis
LOADGEN=$REPO/target/release/loadgen

# ---- temp dir, cleanup ---------------------------------------------------------------------
T=$(mktemp -d /tmp/portcullis-bench.XXXXXX)
chmod 755 "$T"
PIDS=()
MAIN_PID=$BASHPID
cleanup() {
  [ "$BASHPID" = "$MAIN_PID" ] || return 0
  set +e
  [ -n "${NGINX_PID:-}" ] && kill -QUIT "$NGINX_PID" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  [ -n "${DOVECOT_PID:-}" ] && { kill "$DOVECOT_PID" 2>/dev/null; sleep 1; kill -9 "$DOVECOT_PID" 2>/dev/null; }
  if [ "$KEEP" = 1 ]; then echo "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
trap "exit 130" INT TERM

read -r P_D_IMAP P_D_IMAPS P_D_POP3 P_D_POP3S P_D_SUB P_D_SUBS \
  P_N_IMAP P_N_IMAPS P_N_IMAP_BIG P_N_IMAPS_BIG P_N_POP3 P_N_POP3S P_N_POP3_BIG P_N_POP3S_BIG \
  P_N_SMTP P_N_SMTPS P_N_SMTP_BIG P_N_SMTPS_BIG \
  P_P_IMAP P_P_IMAPS P_P_POP3 P_P_POP3S P_P_SUB P_P_SUBS P_SINK P_P_HTTP P_P_HTTPS <<<"$("$LOADGEN" free-ports 27)"

PASSWORD=benchpass MASTER=master MASTER_SECRET=master-secret-$$ USERS=200

# ---- certificate: the dev one if it is ECDSA P-256, else a fresh P-256 one --------------------
CERT=$REPO/certs-dev/server.pem KEY=$REPO/certs-dev/server.key
if ! openssl x509 -in "$CERT" -noout -text 2>/dev/null | grep -q 'prime256v1'; then
  echo "== certs-dev/server.pem is not ECDSA P-256: generating one for the benchmark"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$T/server.key" -out "$T/server.pem" 2>/dev/null
  CERT=$T/server.pem KEY=$T/server.key
fi
cp "$CERT" "$T/cert.pem"; cp "$KEY" "$T/key.pem"; chmod 644 "$T/cert.pem" "$T/key.pem"

# ---- an SMTP sink for Dovecot's submission relay (connected at every submission login) ------
"$LOADGEN" smtpsink --listen "127.0.0.1:$P_SINK" >/dev/null 2>"$T/smtpsink.log" &
PIDS+=($!)

# ---- Dovecot (the backend; master user with separator %) ------------------------------------
D=$T/dovecot
mkdir -p "$D"/{run,state,mail,home}
if [ "$(id -u)" = 0 ]; then
  DV_INTERNAL=dovecot DV_LOGIN=dovenull DV_UID=$(id -u dovecot) DV_GID=$(id -g dovecot)
  DV_GROUP=$(id -gn dovecot)
else
  DV_INTERNAL=$(id -un) DV_LOGIN=$(id -un) DV_UID=$(id -u) DV_GID=$(id -g) DV_GROUP=$(id -gn)
fi
chown "$DV_UID:$DV_GID" "$D/mail" "$D/home"
for i in $(seq 0 $((USERS - 1))); do echo "user$i:{PLAIN}$PASSWORD::::::"; done >"$D/users"
echo "$MASTER:{PLAIN}$MASTER_SECRET" >"$D/masters"
svc() { # service name, plain listener, plain port, tls listener, tls port
  cat <<EOF
service $1-login {
  chroot =
  service_count = 0
  process_min_avail = 2
  client_limit = 4096
  inet_listener $2 {
    address = 127.0.0.1
    port = $3
  }
  inet_listener $4 {
    address = 127.0.0.1
    port = $5
    ssl = yes
  }
}
service $1 {
  process_limit = 4096
}
EOF
}
cat >"$D/dovecot.conf" <<EOF
# Written by bench/compare.sh; never uses /etc/dovecot.
protocols = imap pop3 submission
listen = 127.0.0.1
base_dir = $D/run
state_dir = $D/state
instance_name = bench-$$
log_path = $D/dovecot.log
default_internal_user = $DV_INTERNAL
default_internal_group = $DV_GROUP
default_login_user = $DV_LOGIN
first_valid_uid = 1
first_valid_gid = 1
mail_uid = $DV_UID
mail_gid = $DV_GID
mail_location = maildir:$D/mail/%u
mail_home = $D/home/%u
mail_max_userip_connections = 10000
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = %
passdb {
  driver = passwd-file
  master = yes
  args = $D/masters
  result_success = continue
}
passdb {
  driver = passwd-file
  args = $D/users
}
userdb {
  driver = passwd-file
  args = $D/users
}
namespace inbox {
  inbox = yes
  separator = /
}
hostname = mail.example.org
submission_relay_host = 127.0.0.1
submission_relay_port = $P_SINK
ssl = yes
ssl_cert = <$T/cert.pem
ssl_key = <$T/key.pem
ssl_min_protocol = TLSv1.2
default_process_limit = 4096
default_client_limit = 8192
service anvil {
  chroot =
  client_limit = 20000
}
service auth {
  client_limit = 20000
}
$(svc imap imap "$P_D_IMAP" imaps "$P_D_IMAPS")
$(svc pop3 pop3 "$P_D_POP3" pop3s "$P_D_POP3S")
$(svc submission submission "$P_D_SUB" submissions "$P_D_SUBS")
EOF
dovecot -F -c "$D/dovecot.conf" >"$D/stdout.log" 2>&1 &
DOVECOT_PID=$!

# ---- the auth_http server both proxies ask ---------------------------------------------------
"$LOADGEN" authhttp --password "$PASSWORD" --master "$MASTER" --master-secret "$MASTER_SECRET" \
  --imap-port "$P_D_IMAP" --pop3-port "$P_D_POP3" --smtp-port "$P_D_SUB" >"$T/authhttp.port" 2>"$T/authhttp.log" &
PIDS+=($!)
AUTH_PID=$!

wait_port() { # port, what
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not listen on $1"; return 1
}
wait_port "$P_D_IMAP" dovecot || { cat "$D/stdout.log" "$D/dovecot.log" 2>/dev/null | tail -20; exit 1; }
for _ in $(seq 1 50); do [ -s "$T/authhttp.port" ] && break; sleep 0.1; done
AUTH_PORT=$(cat "$T/authhttp.port")

# ---- the HTTP backend for the HTTP cells (nginx's mail proxy has no HTTP side) --------------
"$LOADGEN" httpbackend --password "$PASSWORD" --master "$MASTER" --master-secret "$MASTER_SECRET" \
  >"$T/httpbackend.port" 2>"$T/httpbackend.log" &
PIDS+=($!)
for _ in $(seq 1 50); do [ -s "$T/httpbackend.port" ] && break; sleep 0.1; done
P_D_HTTP=$(cat "$T/httpbackend.port")

# ---- nginx mail proxy ------------------------------------------------------------------------
N=$T/nginx
mkdir -p "$N"
ng_server() { # port, protocol, ssl?, extra
  echo "  server { listen 127.0.0.1:$1${3:+ ssl}; protocol $2; proxy on; $4 }"
}
cat >"$N/nginx.conf" <<EOF
# Written by bench/compare.sh; never uses /etc/nginx.
load_module $NGINX_MODULE;
worker_processes auto;
pid $N/nginx.pid;
error_log $N/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
mail {
  server_name localhost;
  auth_http 127.0.0.1:$AUTH_PORT/master;
  proxy_pass_error_message on;
  ssl_certificate $T/cert.pem;
  ssl_certificate_key $T/key.pem;
  ssl_protocols TLSv1.2 TLSv1.3;
  smtp_auth plain login;
$(ng_server "$P_N_IMAP" imap "" "")
$(ng_server "$P_N_IMAPS" imap 1 "")
$(ng_server "$P_N_IMAP_BIG" imap "" "proxy_buffer 256k;")
$(ng_server "$P_N_IMAPS_BIG" imap 1 "proxy_buffer 256k;")
$(ng_server "$P_N_POP3" pop3 "" "")
$(ng_server "$P_N_POP3S" pop3 1 "")
$(ng_server "$P_N_POP3_BIG" pop3 "" "proxy_buffer 256k;")
$(ng_server "$P_N_POP3S_BIG" pop3 1 "proxy_buffer 256k;")
$(ng_server "$P_N_SMTP" smtp "" "proxy_smtp_auth on; xclient off;")
$(ng_server "$P_N_SMTPS" smtp 1 "proxy_smtp_auth on; xclient off;")
$(ng_server "$P_N_SMTP_BIG" smtp "" "proxy_smtp_auth on; xclient off; proxy_buffer 256k;")
$(ng_server "$P_N_SMTPS_BIG" smtp 1 "proxy_smtp_auth on; xclient off; proxy_buffer 256k;")
}
EOF
start_nginx() {
  nginx -p "$N" -e "$N/error.log" -c "$N/nginx.conf" -g 'daemon off;' &
  NGINX_PID=$!
  PIDS+=($NGINX_PID)
}
start_nginx

# ---- Portcullis ------------------------------------------------------------------------------
P=$T/portcullis
mkdir -p "$P"
echo "$MASTER_SECRET" >"$P/master.secret"; chmod 600 "$P/master.secret"
pc_listener() { # protocol, port, tls
  printf '[[listener]]\nprotocol = "%s"\nbind = ["127.0.0.1:%s"]\ntls = "%s"\n' "$1" "$2" "$3"
  [ "$3" = none ] && echo "allow_plaintext_auth = true"
  echo
}
cat >"$P/portcullis.toml" <<EOF
# Written by bench/compare.sh.
[server]
hostname = "localhost"
shutdown_grace = "1s"
scheduler = "$SCHEDULER"

[tls]
default_cert = "$T/cert.pem"
default_key = "$T/key.pem"
handshake_timeout = "10s"

$(pc_listener imap "$P_P_IMAP" none)
$(pc_listener imap "$P_P_IMAPS" implicit)
$(pc_listener pop3 "$P_P_POP3" none)
$(pc_listener pop3 "$P_P_POP3S" implicit)
$(pc_listener submission "$P_P_SUB" none)
$(pc_listener submission "$P_P_SUBS" implicit)
$(pc_listener http "$P_P_HTTP" none)
$(pc_listener http "$P_P_HTTPS" implicit)
[backend]
host = "127.0.0.1"
imap = { port = $P_D_IMAP, tls = "none" }
pop3 = { port = $P_D_POP3, tls = "none" }
submission = { port = $P_D_SUB, tls = "none" }
http = { port = $P_D_HTTP, tls = "none" }

[master]
user = "$MASTER"
secret_file = "$P/master.secret"

[authenticator]
kind = "nginx"
url = "http://127.0.0.1:$AUTH_PORT/portcullis"
timeout = "5s"
max_concurrency = 256

[guard]
failure_delay = "0s"
failure_jitter = "0s"
account_sessions = 100000

[limits]
max_connections = 60000
per_ip_connections = 60000
per_ip_new_per_minute = 10000000

[log]
level = "warn"
EOF
"$PORTCULLIS" check-config --config "$P/portcullis.toml" >/dev/null
start_portcullis() {
  "$PORTCULLIS" run --config "$P/portcullis.toml" 2>>"$P/portcullis.log" &
  PORTCULLIS_PID=$!
  PIDS+=($PORTCULLIS_PID)
}
start_portcullis
started() { # who: waits for its listener and notes its processes
  case "$1" in
    nginx)
      wait_port "$P_N_IMAP" nginx || { cat "$N/error.log"; exit 1; }
      NGINX_PIDS=$(echo "$NGINX_PID" $(pgrep -P "$NGINX_PID") | tr ' ' ',') ;;
    portcullis) wait_port "$P_P_IMAP" portcullis || { cat "$P/portcullis.log"; exit 1; } ;;
  esac
}
started nginx
started portcullis
# A fresh process for the idle cells: one that has served other cells hands their freed memory
# to the new connections, and its RSS then hardly grows.
restart() { # who
  local pid
  case "$1" in nginx) pid=$NGINX_PID ;; portcullis) pid=$PORTCULLIS_PID ;; esac
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  case "$1" in nginx) start_nginx ;; portcullis) start_portcullis ;; esac
  started "$1"
}

# ---- running the cells -----------------------------------------------------------------------
RAW=$T/results.jsonl
: >"$RAW"
addr() { # contestant proto tls [big] -> port
  local c=$1 p=$2 s=$3 big=${4:-}
  case "$c/$p/$s/$big" in
    direct/imap/0/*) echo "$P_D_IMAP" ;; direct/imap/1/*) echo "$P_D_IMAPS" ;;
    direct/pop3/0/*) echo "$P_D_POP3" ;; direct/pop3/1/*) echo "$P_D_POP3S" ;;
    direct/smtp/0/*) echo "$P_D_SUB" ;; direct/smtp/1/*) echo "$P_D_SUBS" ;;
    nginx/imap/0/) echo "$P_N_IMAP" ;; nginx/imap/1/) echo "$P_N_IMAPS" ;;
    nginx/imap/0/big) echo "$P_N_IMAP_BIG" ;; nginx/imap/1/big) echo "$P_N_IMAPS_BIG" ;;
    nginx/pop3/0/) echo "$P_N_POP3" ;; nginx/pop3/1/) echo "$P_N_POP3S" ;;
    nginx/pop3/0/big) echo "$P_N_POP3_BIG" ;; nginx/pop3/1/big) echo "$P_N_POP3S_BIG" ;;
    nginx/smtp/0/) echo "$P_N_SMTP" ;; nginx/smtp/1/) echo "$P_N_SMTPS" ;;
    nginx/smtp/0/big) echo "$P_N_SMTP_BIG" ;; nginx/smtp/1/big) echo "$P_N_SMTPS_BIG" ;;
    portcullis/imap/0/*) echo "$P_P_IMAP" ;; portcullis/imap/1/*) echo "$P_P_IMAPS" ;;
    portcullis/pop3/0/*) echo "$P_P_POP3" ;; portcullis/pop3/1/*) echo "$P_P_POP3S" ;;
    portcullis/smtp/0/*) echo "$P_P_SUB" ;; portcullis/smtp/1/*) echo "$P_P_SUBS" ;;
    direct/http/0/*) echo "$P_D_HTTP" ;;
    portcullis/http/0/*) echo "$P_P_HTTP" ;; portcullis/http/1/*) echo "$P_P_HTTPS" ;;
  esac
}
pids_of() { case "$1" in nginx*) echo "$NGINX_PIDS" ;; portcullis) echo "$PORTCULLIS_PID" ;; *) echo "" ;; esac; }
# One generator run; the JSON line gets the repetition number.
run() { # mode label proto tls port args...
  local mode=$1 label=$2 proto=$3 tls=$4 port=$5; shift 5
  local pids out tf=()
  pids=$(pids_of "$label")
  if [ "$tls" = 1 ]; then tf=(--tls); fi
  # A cell that hangs (a stalled transfer) is killed and reported as failed, not waited for.
  out=$(timeout "${RUN_LIMIT:-$((${DURATION%.*} * 3 + 60))}" "$LOADGEN" "$mode" --label "$label" --proto "$proto" --addr "127.0.0.1:$port" \
    "${tf[@]}" --users "$USERS" --password "$PASSWORD" ${pids:+--pids "$pids"} "$@") || { echo "   ($mode $label failed)"; return 0; }
  echo "$out" | python3 -c "import json,sys; d=json.load(sys.stdin); d['rep']=$REP; print(json.dumps(d))" >>"$RAW"
  echo "$out" | python3 -c '
import json,sys; d=json.load(sys.stdin)
keys=["logins_per_s","login_latency_us","proxy_cpu_us_per_login","mib_per_s","proxy_cpu_us_per_mib","connections","proxy_kib_per_connection","errors","first_error"]
print("   %-10s %s" % (d.get("label"), " ".join("%s=%s" % (k, round(d[k],1) if isinstance(d[k], float) else d[k]) for k in keys if k in d)))'
}
rotate() { # rep -> contestant order, rotated so that none always runs first
  case $(( $1 % 3 )) in 0) echo "direct nginx portcullis" ;; 1) echo "nginx portcullis direct" ;; *) echo "portcullis direct nginx" ;; esac
}
FETCH_S=$(python3 -c "print(max(2, $DURATION * 0.8))")

echo "== warm-up"
REP=0
for c in direct nginx portcullis; do
  for s in 0 1; do
    "$LOADGEN" login --proto imap --addr "127.0.0.1:$(addr $c imap $s)" $([ $s = 1 ] && echo --tls) \
      --users "$USERS" --password "$PASSWORD" -c 8 -t 1.5 >/dev/null || { echo "warm-up of $c failed"; tail "$N/error.log" "$P/portcullis.log" "$D/dovecot.log"; exit 1; }
  done
done
START_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

for REP in $(seq 1 "$REPS"); do
  order=$(rotate "$REP")
  if want login; then
    for proto in $PROTOS; do
      concs=$CONC; [ "$proto" = imap ] || concs=$CONC_OTHER
      for s in 0 1; do
        for c in $concs; do
          echo "== rep $REP login $proto tls=$s c=$c"
          for who in $order; do run login "$who" "$proto" "$s" "$(addr "$who" "$proto" "$s")" -c "$c" -t "$DURATION"; done
        done
      done
    done
  fi
  if want fetch; then
    for s in 0 1; do
      for c in 1 8; do
        echo "== rep $REP fetch 4 MiB tls=$s c=$c"
        for who in $order; do
          run fetch "$who" imap "$s" "$(addr "$who" imap "$s")" -c "$c" -t "$FETCH_S"
          [ "$who" = nginx ] && run fetch nginx-256k imap "$s" "$(addr nginx imap "$s" big)" -c "$c" -t "$FETCH_S"
        done
      done
    done
  fi
  if want append; then
    for s in 0 1; do
      echo "== rep $REP append 4 MiB tls=$s c=1"
      for who in $order; do
        run append "$who" imap "$s" "$(addr "$who" imap "$s")" -c 1 -t "$FETCH_S"
        [ "$who" = nginx ] && run append nginx-256k imap "$s" "$(addr nginx imap "$s" big)" -c 1 -t "$FETCH_S"
      done
    done
  fi
  if want retr; then
    # A mailbox download over POP3: the message is placed through direct cleartext IMAP.
    for s in 0 1; do
      echo "== rep $REP retr 4 MiB tls=$s c=1"
      for who in $order; do
        run retr "$who" pop3 "$s" "$(addr "$who" pop3 "$s")" -c 1 -t "$FETCH_S" --prep-addr "127.0.0.1:$P_D_IMAP"
        [ "$who" = nginx ] && run retr nginx-256k pop3 "$s" "$(addr nginx pop3 "$s" big)" -c 1 -t "$FETCH_S" --prep-addr "127.0.0.1:$P_D_IMAP"
      done
    done
  fi
  if want send; then
    # A large message submitted over SMTP (Dovecot relays it to the sink, which discards it).
    for s in 0 1; do
      echo "== rep $REP send 4 MiB over submission tls=$s c=1"
      for who in $order; do
        run send "$who" smtp "$s" "$(addr "$who" smtp "$s")" -c 1 -t "$FETCH_S"
        [ "$who" = nginx ] && run send nginx-256k smtp "$s" "$(addr nginx smtp "$s" big)" -c 1 -t "$FETCH_S"
      done
    done
  fi
  if want http; then
    # HTTP: the backend speaks no TLS, so direct has only the cleartext row.
    for s in 0 1; do
      echo "== rep $REP http (2 GETs with Basic per connection) tls=$s c=16"
      for who in $order; do
        [ "$who" = nginx ] && continue
        [ "$who" = direct ] && [ "$s" = 1 ] && continue
        run login "$who" http "$s" "$(addr "$who" http "$s")" -c 16 -t "$DURATION"
      done
    done
  fi
  if want idle; then
    for s in 0 1; do
      echo "== rep $REP idle IMAP connections: $IDLE_N, tls=$s"
      for who in nginx portcullis; do
        restart "$who"
        # The same warm-up for both: one second of logins of the cell's kind.
        "$LOADGEN" login --proto imap --addr "127.0.0.1:$(addr "$who" imap "$s")" $([ "$s" = 1 ] && echo --tls) \
          --users "$USERS" --password "$PASSWORD" -c 4 -t 1 >/dev/null || true
        sleep 1
        run idle "$who" imap "$s" "$(addr "$who" imap "$s")" -n "$IDLE_N" --hold 3
        sleep 3
      done
    done
  fi
done

if [ "$LEAK" != 0 ]; then
  echo "== leak loop: Portcullis, IMAP over TLS, c=16, ${LEAK}s (after the runs above as warm-up)"
  REP=0
  RUN_LIMIT=$((${LEAK%.*} + 120)) run login portcullis imap 1 "$P_P_IMAPS" -c 16 -t "$LEAK" --rss-every 30
fi

# ---- report ----------------------------------------------------------------------------------
MACHINE="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/{print $2}') GiB RAM, Linux $(uname -r)"
VERSIONS="nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), Dovecot $(dovecot --version | cut -d' ' -f1), Portcullis $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml || echo '+changes')"
CMD="bench/compare.sh --duration $DURATION --reps $REPS --conc \"$CONC\" --protos \"$PROTOS\" --only $ONLY --idle $IDLE_N"
if [ "$LEAK" != 0 ]; then CMD="$CMD --leak $LEAK"; fi
mkdir -p bench
cp "$RAW" bench/last-run.jsonl
python3 bench/report.py "$RAW" --machine "$MACHINE" --versions "$VERSIONS" --command "$CMD" \
  --load "$START_LOAD / $(cut -d' ' -f1-3 /proc/loadavg)" >"$T/report.md"
cat "$T/report.md"
if [ "$WRITE" = 1 ]; then
  python3 - "$T/report.md" <<'EOF'
import sys, re
report = open(sys.argv[1]).read().strip()
path = "bench/RESULTS.md"
text = open(path).read()
begin, end = "<!-- comparison:begin (bench/compare.sh writes this section) -->", "<!-- comparison:end -->"
block = f"{begin}\n{report}\n{end}"
if begin in text and end in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
else:
    text = text.rstrip() + "\n\n" + block + "\n"
open(path, "w").write(text)
EOF
  echo "== written to bench/RESULTS.md (raw JSON: bench/last-run.jsonl)"
fi
