import GranaryCoordination
import Testing

/// A coordination backend under test.
public protocol CoordinationFixture: Sendable, CustomStringConvertible {
    /// A new session.
    func session() async throws -> any CoordinationStore
    /// Expires `session` from outside, as a failed holder would.
    func expire(_ session: any CoordinationStore) async throws
}

/// The coordination-store conformance suite, written once against ``CoordinationStore``.
/// Every check works under a fresh root (`base`) so backends shared between tests stay clean.
public enum CoordinationConformance {
    public static func base() -> String { "/granary-test-\(UInt64.random(in: 0...UInt64.max))" }

    public static func createGetSetDelete(_ fixture: some CoordinationFixture) async throws {
        let store = try await fixture.session()
        let root = base()
        #expect(try await store.create(root, data: [1], mode: .persistent) == root)
        await #expect(throws: CoordinationError.nodeExists(root)) { _ = try await store.create(root, data: [], mode: .persistent) }
        #expect(try await store.get(root) == StoredData(data: [1], version: 0))
        #expect(try await store.set(root, data: [2], expectedVersion: 0) == 1)
        await #expect(throws: CoordinationError.badVersion(path: root, expected: 0, actual: 1)) {
            try await store.set(root, data: [3], expectedVersion: 0)
        }
        #expect(try await store.get(root) == StoredData(data: [2], version: 1))
        #expect(try await store.set(root, data: [4], expectedVersion: nil) == 2)
        _ = try await store.create(root + "/child", data: [], mode: .persistent)
        await #expect(throws: CoordinationError.notEmpty(root)) { try await store.delete(root, expectedVersion: nil) }
        // A missing parent: ZooKeeper names no path, the embedded store names the parent.
        await #expect {
            _ = try await store.create(root + "/missing/x", data: [], mode: .persistent)
        } throws: { error in
            if case .noNode = error as? CoordinationError { return true }
            return false
        }
        #expect(try await store.children(root) == ["child"])
        try await store.delete(root + "/child", expectedVersion: 0)
        await #expect(throws: CoordinationError.badVersion(path: root, expected: 0, actual: 2)) {
            try await store.delete(root, expectedVersion: 0)
        }
        try await store.delete(root, expectedVersion: 2)
        await #expect(throws: CoordinationError.noNode(root)) { _ = try await store.get(root) }
        await store.close()
    }

    public static func sequentialNodes(_ fixture: some CoordinationFixture) async throws {
        let store = try await fixture.session()
        let root = base()
        try await store.createParents(root)
        var names: [String] = []
        for _ in 0..<5 { names.append(try await store.create(root + "/n-", data: [], mode: .sequential)) }
        #expect(names == names.sorted() && Set(names).count == 5, "sequential names \(names)")
        #expect(names.allSatisfy { $0.hasPrefix(root + "/n-") && $0.count == (root + "/n-").count + 10 })
        for name in names { try await store.delete(name, expectedVersion: nil) }
        try await store.delete(root, expectedVersion: nil)
        await store.close()
    }

    /// Also: calls on a closed session fail with ``CoordinationError/sessionExpired``.
    public static func ephemeralsEndWithTheirSession(_ fixture: some CoordinationFixture) async throws {
        let observer = try await fixture.session()
        let root = base()
        try await observer.createParents(root)
        let closing = try await fixture.session()
        let expiring = try await fixture.session()
        _ = try await closing.create(root + "/a", data: [], mode: .ephemeral)
        let b = try await expiring.create(root + "/b-", data: [], mode: [.ephemeral, .sequential])
        await #expect(throws: CoordinationError.noChildrenForEphemerals(root + "/a")) {
            _ = try await closing.create(root + "/a/x", data: [], mode: .persistent)
        }
        let (names, watch) = try await observer.childrenAndWatch(root)
        #expect(names.count == 2)
        await closing.close()
        #expect(await watch.event() == .childrenChanged(root))
        #expect(try await observer.children(root) == [String(b.split(separator: "/").last!)])
        // A closed session refuses every call (never touches the ended session).
        await #expect(throws: CoordinationError.sessionExpired) { _ = try await closing.get(root) }
        await #expect(throws: CoordinationError.sessionExpired) { _ = try await closing.create(root + "/late", data: [], mode: .persistent) }
        // A watch the expiring session set ends with it (ZooKeeper delivers the session's expiry to
        // its watchers): a member following the configuration learns it lost its session.
        let (_, expiringWatch) = try await expiring.existsAndWatch(root + "/never")
        try await fixture.expire(expiring)
        let ended = await withTaskGroup(of: WatchEvent?.self) { group in
            group.addTask { await expiringWatch.event() }
            group.addTask { try? await Task.sleep(for: .seconds(10)); return nil }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
        #expect(ended == .sessionEnded, "the expired session's watch gave \(String(describing: ended)) (nil: nothing within 10 s)")
        // The backend may need a moment to notice; ephemeral removal is what matters.
        var remaining = try await observer.children(root)
        for _ in 0..<100 where !remaining.isEmpty {
            try await Task.sleep(for: .milliseconds(100))
            remaining = try await observer.children(root)
        }
        #expect(remaining.isEmpty, "ephemeral nodes of the expired session remain: \(remaining)")
        await #expect(throws: CoordinationError.sessionExpired) { _ = try await expiring.get(root) }
        try await observer.delete(root, expectedVersion: nil)
        await observer.close()
    }

    public static func watchesFireOnce(_ fixture: some CoordinationFixture) async throws {
        let store = try await fixture.session()
        let other = try await fixture.session()
        let root = base()
        try await store.createParents(root)
        let (_, dataWatch) = try await store.getAndWatch(root)
        try await other.set(root, data: [9], expectedVersion: nil)
        #expect(await dataWatch.event() == .dataChanged(root))
        let (version, existsWatch) = try await store.existsAndWatch(root + "/late")
        #expect(version == nil)
        _ = try await other.create(root + "/late", data: [], mode: .persistent)
        #expect(await existsWatch.event() == .created(root + "/late"))
        let (_, deleteWatch) = try await store.getAndWatch(root + "/late")
        try await other.delete(root + "/late", expectedVersion: nil)
        #expect(await deleteWatch.event() == .deleted(root + "/late"))
        try await store.delete(root, expectedVersion: nil)
        await store.close()
        await other.close()
    }

    public static func multiIsAtomic(_ fixture: some CoordinationFixture) async throws {
        let store = try await fixture.session()
        let root = base()
        try await store.createParents(root)
        _ = try await store.create(root + "/config", data: [1], mode: .persistent)
        // The check fails (version 0 expected 5): nothing of the multi may be applied.
        await #expect(throws: CoordinationError.self) {
            try await store.multi([
                .create(path: root + "/new", data: [], mode: .persistent),
                .set(path: root + "/config", data: [2], expectedVersion: 0),
                .check(path: root + "/config", version: 5),
            ])
        }
        #expect(try await store.exists(root + "/new") == false)
        #expect(try await store.get(root + "/config") == StoredData(data: [1], version: 0))
        try await store.multi([
            .create(path: root + "/new", data: [7], mode: .persistent),
            .set(path: root + "/config", data: [2], expectedVersion: 0),
        ])
        #expect(try await store.get(root + "/new").data == [7])
        #expect(try await store.get(root + "/config") == StoredData(data: [2], version: 1))
        try await store.multi([.delete(path: root + "/new", expectedVersion: 0), .delete(path: root + "/config", expectedVersion: 1)])
        try await store.delete(root, expectedVersion: nil)
        await store.close()
    }
}
