import ServiceLifecycle

/// An embedded cluster as a swift-service-lifecycle `Service`, for a server that runs its
/// services in a `ServiceGroup`: on graceful shutdown (SIGTERM or SIGINT through the group's
/// `gracefulShutdownSignals`, or the group's own shutdown) it shuts the cluster down as
/// ``Cluster/shutdown()`` does: commits in flight end, every committed transaction is applied on
/// every replica, the region files are persisted.
///
/// ```swift
/// let cluster = try await Cluster.local(directory: "/var/lib/myservice/granary")
/// let group = ServiceGroup(configuration: .init(
///     services: [.init(service: ClusterService(cluster: cluster)), .init(service: myHTTPServer)],
///     gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
/// try await group.run()
/// ```
public struct ClusterService: Service {
    /// The cluster this service shuts down.
    public let cluster: Cluster

    /// A service for `cluster`, already started (``Cluster/local(nodes:replicas:directory:options:)``):
    /// the service never starts it, it only shuts it down when ``run()`` ends.
    public init(cluster: Cluster) { self.cluster = cluster }

    /// Runs until graceful shutdown or cancellation, then shuts the cluster down.
    public func run() async throws {
        // Throws when the task is cancelled instead: the cluster is shut down all the same.
        try? await gracefulShutdown()
        try await cluster.shutdown()
    }
}
