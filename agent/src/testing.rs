//! Fixtures and builders shared by the unit tests of every layer.

use crate::model::Labels;

/// Labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Abridged from `kubectl get pod -o yaml` on a dual-stack cluster, fields we ignore kept.
pub const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  annotations:
    kubectl.kubernetes.io/restartedAt: "2026-11-02T10:00:00Z"
    static-egress.io/gateway: corp-fw
  creationTimestamp: "2026-11-02T10:00:03Z"
  generateName: web-7d9f8b6c5-
  labels:
    app: web
    pod-template-hash: 7d9f8b6c5
  name: web-7d9f8b6c5-x2k4p
  namespace: shop
  ownerReferences:
  - apiVersion: apps/v1
    blockOwnerDeletion: true
    controller: true
    kind: ReplicaSet
    name: web-7d9f8b6c5
    uid: 3c1b2a10-0000-4000-8000-000000000001
  resourceVersion: "48213"
  uid: 9a8b7c6d-0000-4000-8000-000000000002
spec:
  containers:
  - image: nginx:1.27
    imagePullPolicy: IfNotPresent
    name: web
    ports:
    - containerPort: 80
      protocol: TCP
    resources:
      limits: {memory: 128Mi}
      requests: {cpu: 100m, memory: 64Mi}
  dnsPolicy: ClusterFirst
  nodeName: worker-1
  restartPolicy: Always
  schedulerName: default-scheduler
  terminationGracePeriodSeconds: 30
  tolerations:
  - effect: NoExecute
    key: node.kubernetes.io/not-ready
    operator: Exists
    tolerationSeconds: 300
  someFutureField: {nested: true}
status:
  conditions:
  - lastProbeTime: null
    lastTransitionTime: "2026-11-02T10:00:05Z"
    status: "True"
    type: Ready
  containerStatuses:
  - containerID: containerd://abc
    image: docker.io/library/nginx:1.27
    imageID: docker.io/library/nginx@sha256:0123
    lastState: {}
    name: web
    ready: true
    restartCount: 0
    started: true
    state:
      running:
        startedAt: "2026-11-02T10:00:04Z"
  hostIP: 10.0.0.11
  hostIPs:
  - ip: 10.0.0.11
  phase: Running
  podIP: fd00:10:244:1::5
  podIPs:
  - ip: fd00:10:244:1::5
  - ip: 10.244.1.5
  qosClass: Burstable
  startTime: "2026-11-02T10:00:03Z"
"#;

/// `kubectl get node -o yaml`, abridged.
pub const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata:
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: worker-1
    kubernetes.io/os: linux
    egress: "true"
  name: worker-1
  resourceVersion: "50000"
spec:
  podCIDR: fd00:10:244:1::/64
  podCIDRs:
  - fd00:10:244:1::/64
  - 10.244.1.0/24
  providerID: kind://docker/kind/worker-1
status:
  addresses:
  - address: fc00:f853:ccd:e793::3
    type: InternalIP
  - address: 10.0.0.11
    type: InternalIP
  - address: 10.0.0.99
    type: InternalIP
  - address: worker-1
    type: Hostname
  allocatable: {cpu: "4", memory: 8Gi, pods: "110"}
  conditions:
  - lastHeartbeatTime: "2026-11-02T10:00:00Z"
    lastTransitionTime: "2026-11-01T10:00:00Z"
    message: kubelet has sufficient memory available
    reason: KubeletHasSufficientMemory
    status: "False"
    type: MemoryPressure
  - lastHeartbeatTime: "2026-11-02T10:00:00Z"
    lastTransitionTime: "2026-11-01T10:00:00Z"
    message: kubelet is posting ready status
    reason: KubeletReady
    status: "True"
    type: Ready
  nodeInfo:
    architecture: amd64
    kubeletVersion: v1.34.1
"#;

/// `kubectl get namespace -o yaml`.
pub const NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  annotations:
    static-egress.io/gateway: corp-fw
  creationTimestamp: "2026-11-01T10:00:00Z"
  labels:
    kubernetes.io/metadata.name: shop
    team: payments
  name: shop
spec:
  finalizers: [kubernetes]
status:
  phase: Active
"#;

/// An `EgressGateway` with every field set.
pub const GATEWAY: &str = r#"
apiVersion: static-egress.io/v1alpha1
kind: EgressGateway
metadata: {name: corp-fw, uid: 3c1b2a10-0000-4000-8000-000000000003}
spec:
  egressIPs: [192.0.2.200, 192.0.2.201]
  nodeSelector: {matchLabels: {egress: "true"}}
  namespaceSelector: {matchLabels: {team: payments}}
  podSelector:
    matchExpressions: [{key: app, operator: In, values: [web]}]
  destinationCIDRs: [203.0.113.0/24, 198.51.100.0/24, 203.0.113.0/24]
  excludedCIDRs: [203.0.113.128/25]
  failurePolicy: FailOpen
  notYetKnown: 1
status: {holders: []}
"#;
