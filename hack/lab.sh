#!/usr/bin/env bash
# The kvm-operator lab: real libvirtd + QEMU/KVM + sshd on one Debian 12 machine, as root.
#
#   hack/lab.sh deps         install only what building the operator needs (libvirt-dev, ...)
#   hack/lab.sh install      install everything the lab and the tests need (idempotent)
#   hack/lab.sh up           start virtlogd + libvirtd (qemu:///system) and a loopback sshd
#   hack/lab.sh hosts [N]    start N simulated hypervisor hosts (default 2) in namespaces, each
#                            with its own libvirtd, sshd and a guest bridge vmbr0 (no uplink)
#   hack/lab.sh fault WHAT ACTION N   libvirtd|sshd stop|start, net down|up, power off|on,
#                            space setup|fill|free on host N
#   hack/lab.sh down         stop everything this script started (only our own PIDs)
#   hack/lab.sh env          print the variables tests read (source it: eval "$(hack/lab.sh env)")
#   hack/lab.sh status       show what is running
#   hack/lab.sh manifests D  write D/lab-nodes.yaml: the hosts as KvmNodes (pinned host keys), the
#                            lab key as a v1 Secret and a dir pool on every host, for
#                            `kvm-operator standalone -f D` (add examples/lab/ for guests)
#
# Everything lives under $KVM_LAB (default /tmp/kvm-lab). Traffic stays on loopback (sshd on
# 127.0.0.1:$KVM_LAB_SSH_PORT) or inside namespaces this script creates (10.77.0.0/24).
# Running any subcommand twice is fine.
set -euo pipefail

LAB=${KVM_LAB:-/tmp/kvm-lab}
SSH_PORT=${KVM_LAB_SSH_PORT:-2222}
NET_PREFIX=10.77.0
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[lab] %s\n' "$*" >&2; }
die() { printf '[lab] error: %s\n' "$*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "the lab must run as root (it starts libvirtd, sshd and namespaces)"; }

BUILD_PACKAGES=(libvirt-dev pkg-config libssl-dev)
DEB_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  libvirt-dev qemu-system-x86 qemu-utils openssh-server openssh-client pkg-config libssl-dev
  iproute2 util-linux procps lvm2 genisoimage lua5.4)
PY_PACKAGES=(helm-python-sdk)

install_debs() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends keeps the image small; the lab needs none of the recommends.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "Debian packages present"
  fi
}

cmd_deps() {
  need_root
  install_debs "${BUILD_PACKAGES[@]}"
}

cmd_install() {
  need_root
  install_debs "${BUILD_PACKAGES[@]}" "${DEB_PACKAGES[@]}"
  local pymissing=()
  for p in "${PY_PACKAGES[@]}"; do
    python3 -m pip show -q "$p" >/dev/null 2>&1 || pymissing+=("$p")
  done
  if [ ${#pymissing[@]} -gt 0 ]; then
    log "installing PyPI packages: ${pymissing[*]}"
    python3 -m pip install -q --disable-pip-version-check "${pymissing[@]}"
  fi
}

# ---------------------------------------------------------------- libvirtd on this machine
configure_qemu_conf() {
  # Without systemd and cgroup delegation, qemu must run as root with no security driver.
  local f=/etc/libvirt/qemu.conf
  grep -q '^# kvm-operator lab' "$f" 2>/dev/null && return 0
  cat >>"$f" <<'EOC'
# kvm-operator lab (hack/lab.sh): no systemd, no cgroups, no security driver
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
EOC
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_libvirtd() {
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  getent group libvirt >/dev/null || groupadd -r libvirt
  mkdir -p /var/log/libvirt/qemu /run/libvirt /var/lib/libvirt/images /var/lib/libvirt/qemu /var/cache/libvirt/qemu
  configure_qemu_conf
  if ! pgrep -x virtlogd >/dev/null; then virtlogd -d; fi
  if ! pid_alive /run/libvirtd.pid && ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d -p /run/libvirtd.pid
  fi
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "libvirtd did not answer on qemu:///system; see /var/log/libvirt/libvirtd.log"
}

# ---------------------------------------------------------------- sshd on loopback
setup_ssh_keys() {
  mkdir -p "$LAB/ssh/bin"
  chmod 700 "$LAB/ssh"
  [ -f "$LAB/ssh/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C kvm-lab-client -f "$LAB/ssh/client_ed25519"
  [ -f "$LAB/ssh/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C kvm-lab-host -f "$LAB/ssh/host_ed25519"
  cp "$LAB/ssh/client_ed25519.pub" "$LAB/ssh/authorized_keys"
  chmod 600 "$LAB/ssh/authorized_keys"
  mkdir -p /run/sshd && chmod 755 /run/sshd
  # libvirt's qemu+ssh runs the `ssh` binary; this wrapper pins it to the lab's known_hosts
  # (strict checking) so tests never touch the user's ~/.ssh.
  cat >"$LAB/ssh/bin/ssh" <<EOW
#!/bin/sh
exec /usr/bin/ssh -o UserKnownHostsFile=$LAB/ssh/known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes "\$@"
EOW
  chmod 755 "$LAB/ssh/bin/ssh"
}

# write_sshd_config FILE PORT LISTEN_ADDR HOST_KEY PID_FILE: key-only root login, the lab's
# authorized key, stream-local forwarding allowed (libvirt's socket can be tunnelled).
write_sshd_config() {
  cat >"$1" <<EOC
Port $2
ListenAddress $3
HostKey $4
PidFile $5
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $LAB/ssh/authorized_keys
StrictModes no
UsePAM no
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
LogLevel VERBOSE
EOC
}

start_sshd() {
  setup_ssh_keys
  write_sshd_config "$LAB/ssh/sshd_config" "$SSH_PORT" 127.0.0.1 "$LAB/ssh/host_ed25519" "$LAB/ssh/sshd.pid"
  if ! pid_alive "$LAB/ssh/sshd.pid"; then
    /usr/sbin/sshd -f "$LAB/ssh/sshd_config" -E "$LAB/ssh/sshd.log"
  fi
  for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/"$SSH_PORT") 2>/dev/null && break
    sleep 0.1
  done
  local kh="$LAB/ssh/known_hosts"
  touch "$kh"
  grep -v "^\[127.0.0.1\]:$SSH_PORT " "$kh" >"$kh.tmp" || true
  echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$LAB/ssh/host_ed25519.pub")" >>"$kh.tmp"
  mv "$kh.tmp" "$kh"
}

cmd_up() {
  need_root
  command -v libvirtd >/dev/null || die "libvirtd is not installed: run 'hack/lab.sh install' first"
  mkdir -p "$LAB"
  start_libvirtd
  start_sshd
  log "up: libvirtd (qemu:///system), sshd 127.0.0.1:$SSH_PORT; kvm: $([ -c /dev/kvm ] && echo yes || echo 'no (software emulation)')"
}

# ---------------------------------------------------------------- namespace hosts
host_name() { printf 'host%d' "$1"; }
host_ip() { printf '%s.%d' "$NET_PREFIX" "$1"; }

# A lab CA and the operator's client certificate (EC P-256; libvirt's GnuTLS reads them).
setup_pki() {
  local d="$LAB/pki"
  mkdir -p "$d" && chmod 700 "$d"
  if [ ! -f "$d/ca.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -keyout "$d/ca.key" -out "$d/ca.crt" -subj /CN=kvm-lab-ca \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  fi
  [ -f "$d/client.crt" ] || issue_cert "$d/client" kvm-operator "extendedKeyUsage=clientAuth"
}

# issue_cert PREFIX CN EXTENSIONS: PREFIX.key + PREFIX.crt signed by the lab CA
issue_cert() {
  local d="$LAB/pki"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  printf '%s\nkeyUsage=critical,digitalSignature,keyEncipherment\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 3650 \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
  chmod 600 "$1.key"
}

setup_host_dirs() {
  local i=$1 b="$LAB/hosts/$(host_name "$1")"
  rm -rf "$b"
  mkdir -p "$b"/{lib/qemu,lib/images,cache/qemu,log/qemu,run,pki}
  setup_pki
  issue_cert "$b/pki/server" "$(host_name "$i")" \
    "subjectAltName=IP:$(host_ip "$i"),DNS:$(host_name "$i")
extendedKeyUsage=serverAuth"
  cp -a /etc/libvirt "$b/etc"
  rm -f "$b"/etc/qemu/*.xml "$b"/etc/storage/*.xml
  rm -rf "$b/etc/qemu/networks" "$b/etc/storage/autostart" "$b/etc/qemu/autostart"
  cat >"$b/etc/libvirtd.conf" <<EOC
host_uuid = "$(printf '00000000-0000-4000-8000-%012d' "$i")"
listen_tls = 1
tls_port = "16514"
key_file = "$b/pki/server.key"
cert_file = "$b/pki/server.crt"
ca_file = "$LAB/pki/ca.crt"
auth_tls = "none"
listen_tcp = 1
tcp_port = "16509"
listen_addr = "$(host_ip "$i")"
auth_tcp = "none"
auth_unix_rw = "none"
log_level = 3
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOC
  cat >>"$b/etc/qemu.conf" <<EOC
stdio_handler = "file"
migration_address = "$(host_ip "$i")"
EOC
  ssh-keygen -q -t ed25519 -N '' -C "$(host_name "$i")" -f "$b/ssh_host_ed25519"
  write_sshd_config "$b/sshd_config" 22 "$(host_ip "$i")" "$b/ssh_host_ed25519" "$b/sshd.pid"
}

# Runs inside `unshare --mount --uts --net --propagation private`: private libvirt dirs, then libvirtd.
cmd_host_init() {
  local i=$1 b="$LAB/hosts/$(host_name "$1")"
  hostname "$(host_name "$i")"
  mount --bind "$b/etc" /etc/libvirt
  mount --bind "$b/lib" /var/lib/libvirt
  mount --bind "$b/cache" /var/cache/libvirt
  mount --bind "$b/log" /var/log/libvirt
  mount --bind "$b/run" /run/libvirt
  mount --bind "$LAB/hosts/hosts" /etc/hosts
  ip link set lo up
  for _ in $(seq 100); do ip link show veth0 >/dev/null 2>&1 && break; sleep 0.1; done
  ip addr add "$(host_ip "$i")/24" dev veth0
  ip link set veth0 up
  # the guests' bridge, as on a real hypervisor (no uplink: guest traffic stays in this namespace)
  ip link add vmbr0 type bridge
  ip link set vmbr0 up
  export PATH="$LAB/ssh/bin:$PATH"
  exec libvirtd -l -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid
}

cmd_hosts() {
  need_root
  local n=${1:-2}
  [ "$n" -ge 1 ] && [ "$n" -le 9 ] || die "hosts: N must be 1..9"
  setup_ssh_keys
  mkdir -p "$LAB/hosts"
  # a control namespace holds the bridge; the test processes join it to reach the hosts
  if ! pid_alive "$LAB/hosts/ctl.pid"; then
    setsid unshare --net --uts sleep infinity </dev/null >/dev/null 2>&1 &
    echo $! >"$LAB/hosts/ctl.pid"
    sleep 0.3
    nsenter -t "$(cat "$LAB/hosts/ctl.pid")" -n sh -c \
      "ip link set lo up; ip link add br0 type bridge; ip addr add $NET_PREFIX.254/24 dev br0; ip link set br0 up"
    # The machine's own namespace joins the bridge as $NET_PREFIX.253, so tests (and the operator)
    # reach the hosts directly. The route covers only the lab's /24.
    ip link del kvmlab0 2>/dev/null || true
    ip link add kvmlab0 type veth peer name pctl netns "$(cat "$LAB/hosts/ctl.pid")"
    ip addr add "$NET_PREFIX.253/24" dev kvmlab0
    ip link set kvmlab0 up
    nsenter -t "$(cat "$LAB/hosts/ctl.pid")" -n sh -c "ip link set pctl master br0; ip link set pctl up"
  fi
  local ctl
  ctl=$(cat "$LAB/hosts/ctl.pid")
  {
    echo "127.0.0.1 localhost"
    for i in $(seq "$n"); do echo "$(host_ip "$i") $(host_name "$i")"; done
    echo "$NET_PREFIX.254 ctl"
  } >"$LAB/hosts/hosts"
  local kh="$LAB/ssh/known_hosts"
  touch "$kh"
  for i in $(seq "$n"); do
    local name b
    name=$(host_name "$i")
    b="$LAB/hosts/$name"
    if pid_alive "$b.pid"; then continue; fi
    setup_host_dirs "$i"
    setsid unshare --mount --uts --net --propagation private "$HERE/lab.sh" host-init "$i" </dev/null >"$b.out" 2>&1 &
    echo $! >"$b.pid"
    sleep 0.3
    nsenter -t "$ctl" -n ip link add "p$i" type veth peer name veth0 netns "$(cat "$b.pid")"
    nsenter -t "$ctl" -n sh -c "ip link set p$i master br0; ip link set p$i up"
    for _ in $(seq 50); do
      nsenter -t "$ctl" -n virsh -c "qemu+tcp://$(host_ip "$i")/system" hostname >/dev/null 2>&1 && break
      sleep 0.2
    done
    nsenter -t "$(cat "$b.pid")" -m -u -n /usr/sbin/sshd -f "$b/sshd_config" -E "$b/sshd.log"
    grep -v "^$(host_ip "$i") " "$kh" >"$kh.tmp" || true
    echo "$(host_ip "$i") $(cut -d' ' -f1,2 "$b/ssh_host_ed25519.pub")" >>"$kh.tmp"
    mv "$kh.tmp" "$kh"
  done
  echo "$n" >"$LAB/hosts/count"
  log "hosts up: $(for i in $(seq "$n"); do printf '%s=%s ' "$(host_name "$i")" "$(host_ip "$i")"; done)(control netns pid $ctl)"
}

# Fault injection for tests: stop or start a namespace host's libvirtd or sshd, cut or restore
# its network link, fill or free a small file system in it. The host's namespaces stay alive
# while either libvirtd or sshd runs in them (the other one holds them).
cmd_fault() {
  need_root
  local what=$1 action=$2 i=$3 b
  b="$LAB/hosts/$(host_name "$i")"
  [ -d "$b" ] || die "no host $i"
  case "$what/$action" in
    libvirtd/stop)
      pid_alive "$b/run/libvirtd.pid" && kill "$(cat "$b/run/libvirtd.pid")"
      for _ in $(seq 50); do pid_alive "$b/run/libvirtd.pid" || break; sleep 0.1; done ;;
    libvirtd/start)
      pid_alive "$b/run/libvirtd.pid" && return 0
      pid_alive "$b/sshd.pid" || die "host $i has neither libvirtd nor sshd: its namespaces are gone"
      nsenter -t "$(cat "$b/sshd.pid")" -m -u -n env PATH="$LAB/ssh/bin:$PATH" \
        libvirtd -d -l -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid
      for _ in $(seq 50); do pid_alive "$b/run/libvirtd.pid" && break; sleep 0.1; done
      cp "$b/run/libvirtd.pid" "$b.pid" ;;
    sshd/stop)
      pid_alive "$b/sshd.pid" && kill "$(cat "$b/sshd.pid")"
      for _ in $(seq 50); do pid_alive "$b/sshd.pid" || break; sleep 0.1; done ;;
    sshd/start)
      pid_alive "$b/sshd.pid" && return 0
      nsenter -t "$(cat "$b/run/libvirtd.pid")" -m -u -n /usr/sbin/sshd -f "$b/sshd_config" -E "$b/sshd.log" ;;
    net/down)
      # cut the host's only link (its veth end on the lab bridge), as a pulled cable would
      nsenter -t "$(cat "$LAB/hosts/ctl.pid")" -n ip link set "p$i" down ;;
    net/up)
      nsenter -t "$(cat "$LAB/hosts/ctl.pid")" -n ip link set "p$i" up ;;
    power/off)
      # as a host that lost power: its guests stop at once (destroyed, no shutdown), its libvirtd
      # is gone and its link is cut. sshd stays alive only to hold the namespaces; cut off, it
      # answers nobody.
      if pid_alive "$b/run/libvirtd.pid"; then
        local hp d
        hp=$(cat "$b/run/libvirtd.pid")
        for d in $(nsenter -t "$hp" -m -n virsh -c qemu:///system list --name 2>/dev/null); do
          nsenter -t "$hp" -m -n virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
        done
      fi
      cmd_fault libvirtd stop "$i"
      cmd_fault net down "$i" ;;
    power/on)
      # booted again: link up, libvirtd started (guests without autostart stay shut off)
      cmd_fault net up "$i"
      cmd_fault libvirtd start "$i" ;;
    space/setup|space/fill|space/free)
      # a small file system on the host: $SPACE/pool for a dir pool, $SPACE/ballast to fill it
      local hp="" SPACE=/var/lib/libvirt/kvmlab-space
      for f in "$b/run/libvirtd.pid" "$b/sshd.pid"; do pid_alive "$f" && { hp=$(cat "$f"); break; }; done
      [ -n "$hp" ] || die "host $i has neither libvirtd nor sshd"
      case "$action" in
        setup)
          nsenter -t "$hp" -m sh -c "mountpoint -q $SPACE || { mkdir -p $SPACE && mount -t tmpfs -o size=${4:-96m},mode=0711 kvmlab-space $SPACE; }; mkdir -p $SPACE/pool" ;;
        fill)
          # leave less than ${4:-1048576} bytes free
          nsenter -t "$hp" -m sh -c "rm -f $SPACE/ballast; avail=\$(( \$(stat -f -c '%a * %S' $SPACE) )); fallocate -l \$(( avail - ${4:-1048576} )) $SPACE/ballast" ;;
        free)
          nsenter -t "$hp" -m rm -f "$SPACE/ballast" ;;
      esac ;;
    *) die "fault: WHAT/ACTION is libvirtd|sshd stop|start, net down|up, power off|on, or space setup|fill|free" ;;
  esac
}

cmd_down() {
  need_root
  if [ -d "$LAB/hosts" ]; then
    local ctl=""
    pid_alive "$LAB/hosts/ctl.pid" && ctl=$(cat "$LAB/hosts/ctl.pid")
    for b in "$LAB"/hosts/host*/; do
      [ -d "$b" ] || continue
      local name pidf
      name=$(basename "$b")
      pidf="$LAB/hosts/$name.pid"
      if pid_alive "$pidf"; then
        local hp
        hp=$(cat "$pidf")
        # destroy guests first so no qemu outlives its libvirtd
        for d in $(nsenter -t "$hp" -m -n virsh -c qemu:///system list --name 2>/dev/null); do
          nsenter -t "$hp" -m -n virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
        done
        pid_alive "$b/sshd.pid" && kill "$(cat "$b/sshd.pid")" 2>/dev/null || true
        kill "$hp" 2>/dev/null || true
      fi
      rm -f "$pidf"
    done
    [ -n "$ctl" ] && kill "$ctl" 2>/dev/null || true
    ip link del kvmlab0 2>/dev/null || true
    rm -f "$LAB/hosts/ctl.pid" "$LAB/hosts/count"
  fi
  pid_alive "$LAB/ssh/sshd.pid" && kill "$(cat "$LAB/ssh/sshd.pid")" 2>/dev/null || true
  log "down (the machine's own libvirtd is left running)"
}

cmd_env() {
  local n=0
  [ -f "$LAB/hosts/count" ] && n=$(cat "$LAB/hosts/count")
  cat <<EOE
export KVM_LAB=$LAB
export KVM_LAB_SSH_ADDR=127.0.0.1
export KVM_LAB_SSH_PORT=$SSH_PORT
export KVM_LAB_SSH_USER=root
export KVM_LAB_SSH_KEY=$LAB/ssh/client_ed25519
export KVM_LAB_KNOWN_HOSTS=$LAB/ssh/known_hosts
export KVM_LAB_HOSTS=$n
export KVM_LAB_PKI=$LAB/pki
EOE
  for i in $(seq "$n"); do
    local pub="$LAB/hosts/$(host_name "$i")/ssh_host_ed25519.pub"
    [ -f "$pub" ] && echo "export KVM_LAB_HOST${i}_ADDR=$(host_ip "$i") KVM_LAB_HOST${i}_FINGERPRINT=$(ssh-keygen -lf "$pub" | cut -d' ' -f2)"
  done
  [ -f "$LAB/ssh/host_ed25519.pub" ] && echo "export KVM_LAB_SSH_FINGERPRINT=$(ssh-keygen -lf "$LAB/ssh/host_ed25519.pub" | cut -d' ' -f2)"
  [ -f "$LAB/hosts/ctl.pid" ] && echo "export KVM_LAB_CTL_PID=$(cat "$LAB/hosts/ctl.pid")"
  return 0
}

cmd_manifests() {
  local dir="$1" n=0
  [ -n "$dir" ] || { echo "usage: hack/lab.sh manifests DIR" >&2; exit 2; }
  [ -f "$LAB/hosts/count" ] && n=$(cat "$LAB/hosts/count")
  [ "$n" -gt 0 ] || { echo "no lab hosts: run hack/lab.sh up && hack/lab.sh hosts 2 first" >&2; exit 1; }
  mkdir -p "$dir"
  local out="$dir/lab-nodes.yaml"
  {
    echo "# Written by hack/lab.sh manifests: the lab's hosts for kvm-operator standalone."
    echo "apiVersion: v1"
    echo "kind: Secret"
    echo "metadata: {name: lab-key}"
    echo "type: kubernetes.io/ssh-auth"
    echo "stringData:"
    echo "  ssh-privatekey: |"
    sed 's/^/    /' "$LAB/ssh/client_ed25519"
    for i in $(seq "$n"); do
      local pub="$LAB/hosts/$(host_name "$i")/ssh_host_ed25519.pub"
      echo "---"
      echo "apiVersion: kvm-operator.io/v1alpha1"
      echo "kind: KvmNode"
      echo "metadata: {name: $(host_name "$i"), labels: {lab.kvm-operator.io/pool: \"yes\"}}"
      echo "spec:"
      echo "  address: $(host_ip "$i")"
      echo "  user: root"
      echo "  sshKeySecretRef: {name: lab-key}"
      echo "  hostKeyFingerprint: $(ssh-keygen -lf "$pub" | cut -d' ' -f2)"
    done
    echo "---"
    echo "apiVersion: kvm-operator.io/v1alpha1"
    echo "kind: StoragePool"
    echo "metadata: {name: lab-images}"
    echo "spec:"
    echo "  nodeSelector: {lab.kvm-operator.io/pool: \"yes\"}"
    echo "  type: dir"
    echo "  targetPath: /var/lib/libvirt/lab-images"
  } > "$out"
  chmod 600 "$out"
  echo "$out"
}

cmd_status() {
  pgrep -a libvirtd || true
  pid_alive "$LAB/ssh/sshd.pid" && echo "sshd 127.0.0.1:$SSH_PORT pid $(cat "$LAB/ssh/sshd.pid")"
  for f in "$LAB"/hosts/host*.pid; do [ -f "$f" ] && pid_alive "$f" && echo "$(basename "$f" .pid) pid $(cat "$f")"; done
  return 0
}

case "${1:-}" in
  deps) cmd_deps ;;
  install) cmd_install ;;
  up) cmd_up ;;
  hosts) shift; cmd_hosts "${1:-2}" ;;
  host-init) shift; cmd_host_init "$1" ;;
  fault) shift; cmd_fault "$@" ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  manifests) shift; cmd_manifests "${1:-}" ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
