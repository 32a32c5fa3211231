import Foundation
import Testing
import GranaryTestSupport
import SystemPackage
@testable import GranaryMemory
#if canImport(Glibc)
import Glibc
#endif

/// A directory on tmpfs (/dev/shm), where spares are used, removed by `remove()`.
private func memoryDirectory() throws -> (TemporaryDirectory, RegionDirectory) {
    var template = Array("/dev/shm/granary-spare-XXXXXX".utf8CString)
    guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
        throw RegionError.systemCall(call: "mkdtemp", path: "/dev/shm", message: String(cString: strerror(errno)))
    }
    let path = FilePath(String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
    return (TemporaryDirectory(existing: path), try RegionDirectory(path))
}

/// Minor page faults this thread has taken so far.
private func minorFaults() -> Int {
    var usage = rusage()
    _ = getrusage(__rusage_who_t(1), &usage)  // RUSAGE_THREAD
    return usage.ru_minflt
}

/// Stores one byte into every page of `region` past its header; returns the minor faults taken.
private func faultsStoringIntoEveryPage(of region: Region) -> Int {
    let before = minorFaults()
    var offset = RegionFormat.headerBytes
    while offset < region.size {
        region.base.storeBytes(of: 0x5A, toByteOffset: offset, as: UInt8.self)
        offset += 4096
    }
    return minorFaults() - before
}

private func spareFiles(in directory: RegionDirectory) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: directory.path.string)) ?? []).filter { $0.hasPrefix("spare.") }.sorted()
}

@Suite("Spare region files", .serialized)
struct SpareRegionTests {
    let cluster = ClusterID(rawValue: 0x5EA5)

    @Test("a region made from a prepared spare takes a store into every page without a page fault; a sparse one faults each in")
    func spareTakesStoresWithoutFaults() throws {
        let (tmp, dir) = try memoryDirectory()
        defer { tmp.remove() }
        #expect(SpareRegion.isMemoryFileSystem(dir), "/dev/shm is not tmpfs here")
        let size = 4 << 20, pages = (size - RegionFormat.headerBytes) / 4096
        let spare = try SpareRegion.create(in: dir, size: size)
        try spare.prepare(chunk: 256 << 10)
        #expect(spare.isReady)
        let region = try dir.create(RegionID(9), size: size, cluster: cluster, from: spare)
        #expect(region.path == dir.path(for: RegionID(9)))
        #expect(spareFiles(in: dir).isEmpty, "the spare's name stayed: \(spareFiles(in: dir))")
        let fromSpare = faultsStoringIntoEveryPage(of: region)
        // (Read only after counting: a read maps pages in too.) Zero but for the bytes stored.
        var unexpected: (offset: Int, word: UInt64)?
        for offset in stride(from: RegionFormat.headerBytes, to: size, by: 8) {
            let word = region.base.load(fromByteOffset: offset, as: UInt64.self)
            if word != (offset % 4096 == 0 ? 0x5A : 0) {
                unexpected = (offset, word)
                break
            }
        }
        #expect(unexpected == nil, "a region made from a spare must start zero past its header: \(String(describing: unexpected))")
        // The control: the same stores into a sparse region fault every page in.
        let sparse = try dir.create(RegionID(10), size: size, cluster: cluster, sparse: true)
        let fromSparse = faultsStoringIntoEveryPage(of: sparse)
        #expect(fromSpare < pages / 16, "stores into \(pages) pages of a region made from a spare took \(fromSpare) page faults")
        #expect(fromSparse >= pages / 2, "the control took only \(fromSparse) faults for \(pages) pages: the test cannot tell")
        // The file is a region like any other: it reopens with its header and the bytes stored.
        let reopened = try dir.open(RegionID(9), cluster: cluster)
        #expect(reopened.kind == .data && reopened.size == size)
        #expect(reopened.base.load(fromByteOffset: RegionFormat.headerBytes, as: UInt8.self) == 0x5A)
    }

    @Test("a spare is claimed once, only when prepared and of the region's size; a claim that fails leaves it a spare")
    func claimsThatFail() throws {
        let (tmp, dir) = try memoryDirectory()
        defer { tmp.remove() }
        let size = 1 << 20
        let spare = try SpareRegion.create(in: dir, size: size)
        #expect(throws: RegionError.corrupt(path: spare.path, reason: "the spare region file is not prepared, or another claim took it")) {
            try dir.create(RegionID(3), size: size, cluster: cluster, from: spare)
        }
        try spare.prepare()
        #expect(throws: RegionError.self) { try dir.create(RegionID(3), size: 2 << 20, cluster: cluster, from: spare) }
        _ = try dir.create(RegionID(4), size: size, cluster: cluster)
        #expect(throws: RegionError.alreadyExists(path: dir.path(for: RegionID(4)))) {
            try dir.create(RegionID(4), size: size, cluster: cluster, from: spare)
        }
        #expect(spare.isReady, "a failed claim must leave the spare claimable")
        #expect(spareFiles(in: dir) == [spare.path.lastComponent!.string])
        let region = try dir.create(RegionID(3), size: size, cluster: cluster, from: spare)
        #expect(region.id == RegionID(3))
        #expect(throws: RegionError.self) { try dir.create(RegionID(5), size: size, cluster: cluster, from: spare) }
        #expect(try dir.open(RegionID(3), cluster: cluster).id == RegionID(3))
        #expect(dir.regionIDs() == [RegionID(3), RegionID(4)], "a spare must never be listed as a region")
    }

    @Test("an unclaimed spare's file goes with it; spares of processes that ended are removed, this process's kept")
    func leftovers() throws {
        let (tmp, dir) = try memoryDirectory()
        defer { tmp.remove() }
        do {
            let spare = try SpareRegion.create(in: dir, size: 1 << 20)
            try spare.prepare()
            #expect(spareFiles(in: dir).count == 1)
        }
        #expect(spareFiles(in: dir).isEmpty, "an unclaimed spare left its file: \(spareFiles(in: dir))")
        var dead: Int32 = 4_000_000
        while kill(dead, 0) == 0 || errno != ESRCH { dead -= 1 }
        let left = dir.path.appending("spare.\(dead).77")
        #expect(FileManager.default.createFile(atPath: left.string, contents: Data(count: 4096)))
        let mine = try SpareRegion.create(in: dir, size: 1 << 20)
        SpareRegion.removeLeftovers(in: dir)
        #expect(spareFiles(in: dir) == [mine.path.lastComponent!.string], "left: \(spareFiles(in: dir))")
    }
}
