//! Warren's Kubernetes operator: the talk's custom resources (see [`crd`]) reconciled on a
//! cluster with kube-rs's controller runtime. The design is `docs/design/kubernetes.md`.

pub mod crd;
