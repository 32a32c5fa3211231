import Foundation
import GranaryMemory
import GranaryTestSupport
import GranaryTransport
import Synchronization
import Testing

/// Each ring of a mailbox is a lane with a claim of its own: different rings are received from
/// by different threads at once, and the poll claim takes them all.
@Suite("Mailbox lanes")
struct MailboxLaneTests {
    @Test("a held lane excludes only itself; the poll claim waits for every lane")
    func lanesExcludeOnlyThemselves() throws {
        let tmp = TemporaryDirectory("granary-lanes")
        defer { tmp.remove() }
        let mailbox = try Mailbox(node: NodeID(0), directory: RegionDirectory(tmp.path.appending("n0")),
                                  cluster: ClusterID.random(), ringCapacity: 4096)
        let held = Atomic<Bool>(false)
        let release = Atomic<Bool>(false)
        let holder = Thread {
            _ = mailbox.withLaneIfAvailable(NodeID(1), kind: .log) { _ in
                held.store(true, ordering: .releasing)
                while !release.load(ordering: .acquiring) { usleep(100) }
            }
        }
        holder.start()
        while !held.load(ordering: .acquiring) { usleep(100) }
        #expect(mailbox.laneHolderThread(NodeID(1), kind: .log) != nil, "the held lane names no holder")
        // The same lane is refused; the other senders' lanes, and n1's queue, are not.
        #expect(mailbox.withLaneIfAvailable(NodeID(1), kind: .log) { _ in true } == nil, "a held lane was lent twice")
        #expect(mailbox.withLaneIfAvailable(NodeID(2), kind: .log) { _ in true } == true, "another sender's lane waited for n1's")
        #expect(mailbox.withLaneIfAvailable(NodeID(1), kind: .messages) { _ in true } == true, "n1's queue waited for n1's log")
        // The whole mailbox is not available while one lane is held, and the refusal takes back
        // what it had taken: the other lanes stay free.
        #expect(mailbox.withPollerIfAvailable { _ in true } == nil, "the poll claim was lent while a lane was held")
        #expect(mailbox.withLaneIfAvailable(NodeID(2), kind: .log) { _ in true } == true, "a refused poll claim left a lane taken")
        let whole = Atomic<Bool>(false)
        let waiter = Thread { mailbox.withPoller { _ in whole.store(true, ordering: .releasing) } }
        waiter.start()
        usleep(20_000)
        let early = whole.load(ordering: .acquiring)
        #expect(!early, "the poll claim was taken while a lane was held")
        release.store(true, ordering: .releasing)
        let deadline = Date().addingTimeInterval(10)
        while !whole.load(ordering: .acquiring), Date() < deadline { usleep(100) }
        let late = whole.load(ordering: .acquiring)
        #expect(late, "the poll claim was not taken within 10 s of the lane's release")
        #expect(mailbox.laneHolderThread(NodeID(1), kind: .log) == nil, "a released lane still names a holder")
    }
}
