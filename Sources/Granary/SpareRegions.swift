import Foundation
import GranaryMemory
import GranaryTransport
import Logging
import Synchronization

/// The spare region files a node keeps ready (``SpareRegion``) for replicas placed on it while it
/// serves: a filler thread makes and prepares spares, paced, up to the number asked for; a
/// replica takes one (``take()``) instead of creating a sparse file. After a take the filler waits
/// until the node has taken none for ``quietAfterTake``, so that making spares again stays out of
/// the way of the recovery and the copies that took them. Only where region files are memory
/// (``SpareRegion/isMemoryFileSystem(_:)``).
package final class SpareRegions: Sendable {
    private struct State {
        var ready: [SpareRegion] = []
        var target = 0
        var started = false
        var stopped = false
        var lastTake: UInt64 = 0
        var taken = 0
    }

    private let state = Mutex(State())
    private let home: RegionDirectory
    private let size: Int
    /// How long the filler waits after the last take before it makes spares again.
    package static let quietAfterTake: UInt64 = 1_000_000_000
    /// Bytes prepared at a time, and the wait after each (64 MiB: about 130 ms of waits).
    package static let chunk = 256 << 10
    package static let pause = Duration.milliseconds(4)

    package init(home: RegionDirectory, size: Int) {
        self.home = home
        self.size = size
    }

    /// Starts keeping `count` spares ready (once; later calls change nothing). Spares left by
    /// processes that ended are removed first.
    package func start(count: Int, logger: Logger) {
        guard count > 0 else { return }
        let first = state.withLock { state -> Bool in
            guard !state.started, !state.stopped else { return false }
            state.started = true
            state.target = count
            return true
        }
        guard first else { return }
        SpareRegion.removeLeftovers(in: home)
        guard SpareRegion.isMemoryFileSystem(home) else {
            logger.info("no spare region files in \(home): it is not on a memory file system (tmpfs); new replicas are made as sparse files")
            return
        }
        Thread.detachNewThread { [self] in fill(logger: logger) }
    }

    /// A prepared spare, if one is ready.
    package func take() -> SpareRegion? {
        state.withLock { state in
            state.lastTake = monotonicNanoseconds()
            guard let spare = state.ready.popLast() else { return nil }
            state.taken += 1
            return spare
        }
    }

    /// Spares ready now.
    package var readyCount: Int { state.withLock { $0.ready.count } }
    /// Spares taken for replicas so far.
    package var takenCount: Int { state.withLock { $0.taken } }

    /// Stops the filler and removes the spares not taken.
    package func stop() {
        let dropped = state.withLock { state -> [SpareRegion] in
            state.stopped = true
            defer { state.ready.removeAll() }
            return state.ready
        }
        _ = dropped  // their files go with them
    }

    private func fill(logger: Logger) {
        while true {
            let (stopped, needed, quietUntil) = state.withLock {
                ($0.stopped, $0.ready.count < $0.target, $0.lastTake == 0 ? 0 : $0.lastTake + Self.quietAfterTake)
            }
            if stopped { return }
            guard needed, monotonicNanoseconds() >= quietUntil else {
                usleep(10_000)
                continue
            }
            do throws(RegionError) {
                let spare = try SpareRegion.create(in: home, size: size)
                try spare.prepare(chunk: Self.chunk, pausing: Self.pause)
                let kept = state.withLock { state -> Bool in
                    guard !state.stopped else { return false }
                    state.ready.append(spare)
                    return true
                }
                if !kept { return }
            } catch {
                logger.error("could not make a spare region file in \(home): \(error); new replicas placed on this node are made as sparse files")
                return
            }
        }
    }
}
