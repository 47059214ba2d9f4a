// Pins the etcd server built by hack/tools for the test control plane.
module atlax.dev/hack/etcd

go 1.23

require go.etcd.io/etcd/server/v3 v3.5.21
