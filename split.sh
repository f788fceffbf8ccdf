# split.sh PIDS... : run wrk against $URL with $LUA for 5s, print user/sys us/req summed over pids
t() { for p in "$@"; do awk '{print $14, $15}' /proc/$p/stat; done | awk '{u+=$1; s+=$2} END {print u, s}'; }
read u0 s0 < <(t "$@")
req=$(taskset -c 0 wrk -t1 -c${C:-64} -d5s -s $LUA $URL | awk '/requests in/ {print $1}')
read u1 s1 < <(t "$@")
awk -v u=$((u1-u0)) -v s=$((s1-s0)) -v r=$req 'BEGIN{printf "req %d user %.2f sys %.2f total %.2f us/req\n", r, u*1e4/r, s*1e4/r, (u+s)*1e4/r}'
