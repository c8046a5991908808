//! The one registry of the process and the metrics in it.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

const NAMESPACE: &str = "virtdisk_csi";

/// From a cheap Probe (~1 ms) to a slow detach or a big copy (minutes).
const RPC_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub(super) struct Metrics {
    registry: Registry,
    pub rpc_requests: IntCounterVec,
    pub rpc_errors: IntCounterVec,
    pub rpc_seconds: HistogramVec,
    pub rpc_in_flight: IntGaugeVec,
    pub attach_seconds: HistogramVec,
    pub detach_seconds: HistogramVec,
    pub host_up: IntGaugeVec,
    pub operation_seconds: HistogramVec,
    pub group_snapshots: IntCounterVec,
    pub pool_size_bytes: prometheus::GaugeVec,
    pub pool_free_bytes: prometheus::GaugeVec,
    pub pool_provisioned_bytes: prometheus::GaugeVec,
    pub pool_limit_bytes: prometheus::GaugeVec,
    pub pool_volumes: IntGaugeVec,
    pub pool_unreadable_records: IntGaugeVec,
    pub pool_up: IntGaugeVec,
    pub build_info: IntGaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn hopts(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(RPC_BUCKETS.to_vec())
}

impl Metrics {
    fn new() -> Metrics {
        let rpc = ["service", "method"];
        let rpc_code = ["service", "method", "code"];
        let pool = ["pool"];
        let m = Metrics {
            registry: Registry::new(),
            rpc_requests: IntCounterVec::new(
                opts(
                    "rpc_requests_total",
                    "CSI RPCs handled, by gRPC status code",
                ),
                &rpc_code,
            )
            .unwrap(),
            rpc_errors: IntCounterVec::new(
                opts(
                    "rpc_errors_total",
                    "CSI RPCs that did not return OK, by gRPC status code",
                ),
                &rpc_code,
            )
            .unwrap(),
            rpc_seconds: HistogramVec::new(
                hopts("rpc_duration_seconds", "Time to answer a CSI RPC"),
                &rpc,
            )
            .unwrap(),
            rpc_in_flight: IntGaugeVec::new(
                opts("rpc_in_flight", "CSI RPCs being handled now"),
                &rpc,
            )
            .unwrap(),
            attach_seconds: HistogramVec::new(
                hopts(
                    "attach_duration_seconds",
                    "Time to attach a volume to a node and confirm it, by hypervisor host",
                ),
                &["host"],
            )
            .unwrap(),
            detach_seconds: HistogramVec::new(
                hopts(
                    "detach_duration_seconds",
                    "Time to detach a volume from a node and confirm it, by hypervisor host",
                ),
                &["host"],
            )
            .unwrap(),
            host_up: IntGaugeVec::new(
                opts(
                    "host_up",
                    "1 when the last libvirt call to the hypervisor host reached its libvirtd, 0 \
                     when it could not",
                ),
                &["host"],
            )
            .unwrap(),
            operation_seconds: HistogramVec::new(
                hopts(
                    "operation_duration_seconds",
                    "Time of other timed steps (snapshot, resize, ...)",
                ),
                &["operation"],
            )
            .unwrap(),
            group_snapshots: IntCounterVec::new(
                opts(
                    "group_snapshots_total",
                    "Group snapshots created, by the guarantee met (offline, crash-consistent, \
                     application-consistent)",
                ),
                &["consistency"],
            )
            .unwrap(),
            pool_size_bytes: prometheus::GaugeVec::new(
                opts("pool_size_bytes", "Size of the filesystem holding the pool"),
                &pool,
            )
            .unwrap(),
            pool_free_bytes: prometheus::GaugeVec::new(
                opts(
                    "pool_free_bytes",
                    "Free bytes of the filesystem holding the pool",
                ),
                &pool,
            )
            .unwrap(),
            pool_provisioned_bytes: prometheus::GaugeVec::new(
                opts(
                    "pool_provisioned_bytes",
                    "Sum of the virtual sizes of the pool's volumes",
                ),
                &pool,
            )
            .unwrap(),
            pool_limit_bytes: prometheus::GaugeVec::new(
                opts(
                    "pool_capacity_limit_bytes",
                    "The pool's configured capacity_bytes (absent when unlimited)",
                ),
                &pool,
            )
            .unwrap(),
            pool_volumes: IntGaugeVec::new(opts("pool_volumes", "Volumes in the pool"), &pool)
                .unwrap(),
            pool_unreadable_records: IntGaugeVec::new(
                opts(
                    "pool_unreadable_records",
                    "Records of the pool that exist but cannot be read, by kind (volumes, \
                     snapshots, groups, flatten): while a volume record is unreadable no new \
                     volume name is taken, since it may hold that name; the log names the file",
                ),
                &["pool", "kind"],
            )
            .unwrap(),
            pool_up: IntGaugeVec::new(
                opts(
                    "pool_up",
                    "1 when the pool's directory could be read at the last scrape",
                ),
                &pool,
            )
            .unwrap(),
            build_info: IntGaugeVec::new(
                opts("build_info", "Version and mode of the running plugin"),
                &["version", "mode"],
            )
            .unwrap(),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.rpc_requests.clone()),
            Box::new(m.rpc_errors.clone()),
            Box::new(m.rpc_seconds.clone()),
            Box::new(m.rpc_in_flight.clone()),
            Box::new(m.attach_seconds.clone()),
            Box::new(m.detach_seconds.clone()),
            Box::new(m.host_up.clone()),
            Box::new(m.operation_seconds.clone()),
            Box::new(m.group_snapshots.clone()),
            Box::new(m.pool_size_bytes.clone()),
            Box::new(m.pool_free_bytes.clone()),
            Box::new(m.pool_provisioned_bytes.clone()),
            Box::new(m.pool_limit_bytes.clone()),
            Box::new(m.pool_volumes.clone()),
            Box::new(m.pool_unreadable_records.clone()),
            Box::new(m.pool_up.clone()),
            Box::new(m.build_info.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    pub(super) fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub(super) fn get() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histograms_and_counters() {
        let m = get();
        m.rpc_requests
            .with_label_values(&["Identity", "Probe", "OK"])
            .inc();
        m.rpc_seconds
            .with_label_values(&["Identity", "Probe"])
            .observe(0.002);
        m.attach_seconds.with_label_values(&["hv1"]).observe(0.03);
        let text = m.render();
        assert!(text.contains(
            "virtdisk_csi_rpc_requests_total{code=\"OK\",method=\"Probe\",service=\"Identity\"}"
        ));
        assert!(text.contains("virtdisk_csi_rpc_duration_seconds_bucket{method=\"Probe\""));
        assert!(text.contains("virtdisk_csi_attach_duration_seconds_count{host=\"hv1\"}"));
    }
}
