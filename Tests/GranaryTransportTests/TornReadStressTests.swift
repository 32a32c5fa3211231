import GranaryMemory
import GranaryTestSupport
import GranaryTransport
import Synchronization
import Testing

/// Writers install multi-cache-line objects under their lock (as primaries do) while readers take
/// one-sided reads of the whole objects. Every read the layout accepts must be a state some writer
/// wrote whole: each write fills every payload word with one value, so an accepted read whose words
/// differ is a torn read that slipped through.
///
/// Run once with ``Transport/read(from:_:into:)`` (a sequence lock per line) and once with
/// ``Transport/readObject(from:_:into:)`` (the object's header as the sequence lock over its lines).
@Suite("Torn reads")
struct TornReadStressTests {
    @Test("every one-sided read the layout accepts equals a whole write", arguments: ["read", "readObject"])
    func acceptedReadsAreWhole(operation: String) async throws {
        let pair = try SharedMemoryFixture().makePair()
        defer { pair.teardown() }
        let lines = 8
        let words = ObjectLayout.payloadCapacity(lines: lines) / 8
        let objects = 4
        let writesPerWriter = 20_000
        let writers = 2, readers = 2
        // Objects live in the remote node's region; writers act as its CPU on their own mapping.
        let regionBase = try pair.remote.localPointer(pair.region)
        let offsets = (0..<objects).map { 65536 + $0 * lines * 64 }
        for offset in offsets {
            ObjectLayout.stamp(regionBase + offset, lines: lines, header: ObjectHeader(version: 0, incarnation: 0, allocated: true))
        }
        let done = Atomic<Int>(0)
        let accepted = Atomic<Int>(0), locked = Atomic<Int>(0), torn = Atomic<Int>(0), broken = Atomic<Int>(0)
        let mixedRaw = Atomic<Int>(0)  // snapshots whose payload is mixed, whatever the check said
        let firstBroken = Mutex<String?>(nil)
        let base = UInt(bitPattern: regionBase)

        await runThreads(writers + readers) { thread in
            if thread < writers {
                var payload = [UInt64](repeating: 0, count: words)
                var written = 0
                var index = thread
                while written < writesPerWriter {
                    index = (index &+ 1) % objects
                    let object = UnsafeMutableRawPointer(bitPattern: base)! + offsets[index]
                    let header = ObjectLayout.loadHeader(object)
                    guard !header.isLocked, ObjectLayout.tryLock(object, expected: header).locked else { continue }
                    let value = UInt64(thread + 1) << 40 | UInt64(written)
                    for w in 0..<words { payload[w] = value }
                    payload.withUnsafeBytes {
                        ObjectLayout.install(object, lines: lines, payload: $0.baseAddress!, count: words * 8, header: header.nextVersion)
                    }
                    written += 1
                }
                done.add(1, ordering: .releasing)
            } else {
                let snapshot = UnsafeMutableRawBufferPointer.allocate(byteCount: lines * 64, alignment: 64)
                defer { snapshot.deallocate() }
                var payload = [UInt64](repeating: 0, count: words)
                var index = thread
                while done.load(ordering: .acquiring) < writers {
                    index = (index &+ 1) % objects
                    let address = GlobalAddress(region: pair.region, offset: UInt32(offsets[index]))
                    if operation == "readObject" {
                        try! pair.local.readObject(from: pair.remoteNode, address, into: snapshot)
                    } else {
                        try! pair.local.read(from: pair.remoteNode, address, into: snapshot)
                    }
                    let verdict = SnapshotVerdict.judge(snapshot.baseAddress!, lines: lines, words: words, address: address, payload: &payload)
                    if payload.contains(where: { $0 != payload[0] }) { mixedRaw.add(1, ordering: .relaxed) }
                    switch verdict {
                    case .locked: locked.add(1, ordering: .relaxed)
                    case .torn: torn.add(1, ordering: .relaxed)
                    case .accepted: accepted.add(1, ordering: .relaxed)
                    case .acceptedButTorn(let evidence):
                        accepted.add(1, ordering: .relaxed)
                        broken.add(1, ordering: .relaxed)
                        firstBroken.withLock { first in if first == nil { first = evidence } }
                    }
                }
            }
        }
        let summary = "accepted \(accepted.load(ordering: .relaxed)), rejected locked \(locked.load(ordering: .relaxed)), rejected torn \(torn.load(ordering: .relaxed)), accepted but torn \(broken.load(ordering: .relaxed)); snapshots with mixed payload (before the check) \(mixedRaw.load(ordering: .relaxed))"
        print("torn-read stress (\(operation)): \(summary)")
        #expect(broken.load(ordering: .relaxed) == 0, "\(summary); first: \(firstBroken.withLock { $0 } ?? "")")
        #expect(accepted.load(ordering: .relaxed) > 0, "no read was ever accepted: \(summary)")
        #expect(locked.load(ordering: .relaxed) + torn.load(ordering: .relaxed) > 0, "readers never overlapped a write: \(summary)")
    }
}
