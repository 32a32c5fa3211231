import GranaryConfiguration
import GranaryMemory

/// Adds a data region whose primary is `primary` to the cluster's configuration (FaRM: "the CM
/// allocates regions on demand"): creates it on every replica, records the configuration where
/// a restart finds it, and moves every engine to it. Returns once `primary`'s engine is in a
/// configuration that places the region on it.
package typealias RegionSupplier = @Sendable (_ primary: NodeID) throws -> Void

extension Engine {
    /// Lets allocations that find every region of this node full ask `supplier` for one more
    /// (nil: they fail with ``TransactionError/outOfMemory(bytes:reason:)``, as when no supplier
    /// was set). An embedded cluster on its static configuration sets one, and so does a member
    /// running the configuration manager's protocol (the CM places the region).
    package func supplyRegions(with supplier: RegionSupplier?) {
        regionSupplier.withLock { $0 = supplier }
    }

    /// Called by ``Transaction/allocate(raw:)`` when no region of this node had room in the
    /// configuration `seen`: asks for a region, unless the node has moved to another
    /// configuration since (one that may have room: the attempt runs again there). One request
    /// at a time per node: a thread that waited behind another's finds the node moved on.
    ///
    /// - Throws: ``TransactionError/outOfMemory(bytes:reason:)`` when there is no supplier or it
    ///   failed (naming why: no region id left, a file that could not be created).
    func requestRegion(seenIn seen: ConfigurationID, bytes: Int, full reason: String) throws(TransactionError) {
        try regionSupplier.withLock { (supplier: inout RegionSupplier?) throws(TransactionError) in
            guard let supplier else {
                throw .outOfMemory(bytes: bytes, reason: "\(reason); this node's cluster adds no regions on demand (node processes on a static configuration keep the regions they were given: give them more, or larger ones, or run them with a configuration manager)")
            }
            guard configuration.id == seen else { return }
            do {
                try supplier(node)
            } catch {
                throw .outOfMemory(bytes: bytes, reason: "\(reason), and no region could be added: \(error)")
            }
        }
    }
}
